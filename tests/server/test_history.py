"""The one summary of a round that the coordinator's status, the simulation and the benchmarks show."""

from __future__ import annotations

from dataclasses import asdict

from fedlora.server.history import RoundLog, summarise_round


def entry(**fields) -> dict:
    log = RoundLog(
        round=3,
        clients=[
            {"node": 1, "num-examples": 20.0, "epsilon": 1.5, "loss": 0.5},
            {"node": 2, "num-examples": 30.0, "epsilon": 2.5},
            {"node": 4, "num-examples": 10.0, "epsilon": 0.5, "loss": 0.25},
        ],
        dropped=[{"node": 9, "reason": "data error"}],
    )
    return {**asdict(log), "central": {"accuracy": 0.75, "loss": 0.6}, "time": 0.0, **fields}


def test_a_round_in_figures() -> None:
    s = summarise_round(entry())
    assert (s.round, s.replies, s.dropped, s.examples, s.epsilon) == (3, 3, 1, 60.0, 2.5)
    assert s.client_loss == 0.375  # only the clients that released a loss count
    assert s.line(5) == (
        "round 3/5: 3 replies, 1 dropped, loss 0.3750, epsilon 2.500, central accuracy 0.75, central loss 0.6"
    )


def test_a_round_without_replies_or_released_losses() -> None:
    s = summarise_round(entry(clients=[], central={}))
    assert (s.replies, s.epsilon, s.client_loss, s.examples) == (0, 0.0, None, 0.0)
    assert s.line(5) == "round 3/5: 0 replies, 1 dropped"
    quiet = summarise_round(entry(clients=[{"node": 1, "num-examples": 5.0, "epsilon": 1.0}]))
    assert quiet.client_loss is None and "loss" not in quiet.line(5).split("central")[0]


def test_round_zero_has_only_central_scores() -> None:
    s = summarise_round({"round": 0, "central": {"accuracy": 0.5}, "time": 0.0})
    assert (s.round, s.replies, s.dropped, s.central) == (0, 0, 0, {"accuracy": 0.5})
