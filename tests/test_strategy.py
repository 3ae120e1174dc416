"""The server's LoRA strategy: validation of replies and FedAvg of deltas, on hand-built messages."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from helpers_messages import metadata

from fedlora.common import protocol as P
from fedlora.common.adapter import from_record
from fedlora.common.config import load_config
from fedlora.server.strategy import LoraFedAdam, build_strategy

FP = "f1ngerpr1nt"
SHAPES = {
    "base_model.model.l0.q.lora_A.weight": (4, 6),
    "base_model.model.l0.q.lora_B.weight": (5, 4),
    "base_model.model.classifier.weight": (3, 5),
}


def state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


def reply(node: int, update: dict, num: int, fingerprint: str = FP, **metrics) -> Message:
    md = metadata(node, 0, reply_to="x")
    values = {P.NUM_EXAMPLES: num, P.LOSS: 1.0, P.EPSILON: 0.5, P.LORA_R: 4, P.LORA_SCALE: 4.0, **metrics}
    content = RecordDict(
        {
            P.ARRAYS: ArrayRecord({k: v.contiguous() for k, v in update.items()}),
            P.METRICS: MetricRecord(values),
            P.CONFIG: ConfigRecord({P.FINGERPRINT: fingerprint}),
        }
    )
    return Message(content=content, metadata=md)


def error_reply(node: int, reason: str) -> Message:
    md = metadata(node, 0, reply_to="x")
    return Message(error=Error(code=1, reason=reason), metadata=md)


@pytest.fixture
def strategy():
    cfg = load_config(overrides=["model.lora_r=4", "model.lora_alpha=16", "federation.min_clients=2"])
    s = build_strategy(cfg, FP, num_clients=3)
    s.global_state = state(0)
    return s


def test_fedavg_of_deltas_is_the_weighted_mean(strategy) -> None:
    deltas, nums = [state(1, 0.1), state(2, 0.1), state(3, 0.1)], [10, 30, 60]
    arrays, metrics = strategy.aggregate_train(
        1, [reply(i + 1, d, n) for i, (d, n) in enumerate(zip(deltas, nums, strict=True))]
    )
    got = from_record(arrays)
    for key in SHAPES:
        hand = strategy.global_state[key] + sum(n * d[key] for d, n in zip(deltas, nums, strict=True)) / sum(
            nums
        )
        torch.testing.assert_close(got[key], hand, rtol=1e-6, atol=1e-6)
    assert metrics[P.NUM_EXAMPLES] == 100
    assert strategy.rounds[-1].dropped == []


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (
            lambda: reply(
                9,
                {**state(4, 0.1), "base_model.model.l0.q.lora_A.weight": torch.full((4, 6), float("nan"))},
                50,
            ),
            "non-finite",
        ),
        (
            lambda: reply(9, {**state(4, 0.1), "base_model.model.l0.q.lora_B.weight": torch.zeros(5, 8)}, 50),
            "shape",
        ),
        (lambda: reply(9, state(4, 0.1), 50, fingerprint="someone-else"), "fingerprint"),
        (
            lambda: reply(9, {k: v for k, v in state(4, 0.1).items() if "classifier" not in k}, 50),
            "missing key",
        ),
        (
            lambda: reply(9, {**state(4, 0.1), "base_model.model.extra.weight": torch.zeros(2)}, 50),
            "unexpected key",
        ),
        (lambda: reply(9, state(4, 0.1), -5), "positive"),
        (lambda: error_reply(9, "client crashed: boom"), "boom"),
    ],
    ids=["nan", "wrong-shape", "wrong-fingerprint", "missing-key", "extra-key", "negative-count", "error"],
)
def test_bad_reply_is_dropped_and_round_completes(strategy, bad, reason) -> None:
    good = [state(1, 0.1), state(2, 0.1)]
    arrays, _ = strategy.aggregate_train(1, [reply(1, good[0], 10), bad(), reply(2, good[1], 30)])
    dropped = strategy.rounds[-1].dropped
    assert [d["node"] for d in dropped] == [9]
    assert reason in dropped[0]["reason"]
    got = from_record(arrays)
    for key in SHAPES:
        hand = strategy.global_state[key] + (10 * good[0][key] + 30 * good[1][key]) / 40
        torch.testing.assert_close(got[key], hand, rtol=1e-6, atol=1e-6)


def test_norm_bound_drops_oversized_update() -> None:
    cfg = load_config(overrides=["model.lora_r=4", "model.lora_alpha=16", "federation.max_update_norm=1.0"])
    s = build_strategy(cfg, FP, num_clients=2)
    s.global_state = state(0)
    s.aggregate_train(1, [reply(1, state(1, 0.01), 10), reply(2, state(2, 10.0), 10)])
    assert [d["node"] for d in s.rounds[-1].dropped] == [2]
    assert "exceeds the bound" in s.rounds[-1].dropped[0]["reason"]


def test_no_usable_reply_keeps_the_global(strategy) -> None:
    assert strategy.aggregate_train(1, [error_reply(1, "x"), reply(2, state(1), 5, fingerprint="other")]) == (
        None,
        None,
    )


def test_epsilon_reports_the_largest_spend(strategy) -> None:
    _, metrics = strategy.aggregate_train(
        1, [reply(1, state(1, 0.1), 10, **{P.EPSILON: 2.0}), reply(2, state(2, 0.1), 90, **{P.EPSILON: 7.0})]
    )
    assert metrics[P.EPSILON] == 7.0


def test_server_optimiser_state_round_trips() -> None:
    cfg = load_config(overrides=["model.lora_r=4", "model.lora_alpha=16", "federation.strategy=fedadam"])
    s = build_strategy(cfg, FP, num_clients=2)
    assert isinstance(s, LoraFedAdam)
    s.global_state = state(0)
    s.current_arrays = {k: v.numpy() for k, v in s.global_state.items()}
    arrays, _ = s.aggregate_train(1, [reply(1, state(1, 0.1), 10), reply(2, state(2, 0.1), 10)])
    plain_mean = {k: s.global_state[k] + (state(1, 0.1)[k] + state(2, 0.1)[k]) / 2 for k in SHAPES}
    got = from_record(arrays)
    assert any(not torch.allclose(got[k], plain_mean[k]) for k in SHAPES)  # Adam moved it differently
    saved = s.state_tensors()
    assert {k.split("/")[0] for k in saved} == {"m_t", "v_t", "node_layout"}
    fresh = build_strategy(cfg, FP, num_clients=2)
    fresh.load_state_tensors(saved)
    for name in ("m_t", "v_t"):
        for k, v in getattr(s, name).items():
            assert (getattr(fresh, name)[k] == v).all()


def test_round_config_carries_absolute_round_and_fingerprint() -> None:
    cfg = load_config(overrides=["model.lora_r=4", "model.lora_alpha=16"])
    s = build_strategy(cfg, FP, num_clients=2, round_offset=2)
    config = s._round_config(1, ConfigRecord())
    assert config[P.ROUND] == 3 and config[P.FINGERPRINT] == FP and config[P.LORA_R] == 4


class Nodes:
    """The one part of a Grid that sampling reads: which nodes are connected."""

    def __init__(self, *ids: int) -> None:
        self.ids = ids

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


def test_lower_rank_nodes_evaluate_the_new_global_truncated_once_per_rank(monkeypatch) -> None:
    """After aggregation the evaluate messages carry the new global adapter, at each known node's
    rank with its fold; the SVD is done once per rank and adapter, not once per node."""
    cfg = load_config(overrides=["model.lora_r=4", "model.lora_alpha=16", "federation.aggregator=exact"])
    s = build_strategy(cfg, FP, num_clients=3)
    for field in ("_task_id", "_run_id", "_node_id"):  # what a ServerApp process would have set
        monkeypatch.setattr(TaskIdentity, field, 1)
    s.node_layouts = {1: (2, 8.0), 2: (2, 8.0), 3: (4, 4.0)}
    old, new = state(0), state(5)
    s._set_global(ArrayRecord({k: v.contiguous() for k, v in old.items()}))
    s._own(2, 8.0)
    calls = []
    truncate = s.aggregator.for_client
    monkeypatch.setattr(s.aggregator, "for_client", lambda *a: calls.append(a[1:]) or truncate(*a))
    messages = s.configure_evaluate(
        1, ArrayRecord({k: v.contiguous() for k, v in new.items()}), ConfigRecord(), Nodes(1, 2, 3)
    )
    by_node = {m.metadata.dst_node_id: m.content for m in messages}
    expected = truncate(new, 2, 8.0)
    for node in (1, 2):
        got = from_record(by_node[node][P.ARRAYS])
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
        assert by_node[node][P.CONFIG][P.LORA_R] == 2 and P.FOLD in by_node[node]
    assert from_record(by_node[3][P.ARRAYS]).keys() == new.keys() and P.FOLD not in by_node[3]
    assert calls == [(2, 8.0)]
