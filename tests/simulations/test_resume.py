"""A federation resumed after a crash makes the same next round, bit for bit, as one that never stopped.

The real ServerApp body (server.app.run_server: strategy, checkpoint after every round, restore) drives
real ClientApp training (client.app.handle_train on tiny-BERT, DP off) through a grid that runs the
clients in this process. The clients are made deterministic (their RNGs seeded by node and round, the
replies returned in node order), so any difference between the two runs is the server's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from unittest import mock

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora.client.app import build_client_app
from fedlora.client.ledger import STATISTICS_ROUND, PrivacyLedger
from fedlora.client.trainer import LocalTrainer
from fedlora.common import protocol as P
from fedlora.common.config import FedloraConfig, load_config
from fedlora.common.errors import CheckpointError, FedloraError
from fedlora.server.app import ServerSettings, run_server
from fedlora.server.checkpoint import load_checkpoint, save_checkpoint
from fedlora.simulations.virtual_client import ledger_file
from helpers.grid import NODES, Crash, InProcessGrid, run

pytestmark = pytest.mark.slow

BASE = [
    "model.source=tiny-bert",
    "data.max_length=32",
    "training.local_steps=2",
    "training.batch_size=8",
    "training.learning_rate=0.05",
    "training.seed=3",
    "privacy.enabled=false",
    "federation.rounds=2",
    "federation.min_clients=2",
    "federation.fraction_evaluate=0",
    "federation.central_eval=false",
    "simulation.num_clients=2",
    "simulation.partition=iid",
]


@pytest.fixture(autouse=True)
def _inside_a_serverapp(monkeypatch) -> None:
    for attribute in ("_run_id", "_node_id", "_task_id"):  # Message() as inside a ServerApp process
        monkeypatch.setattr(TaskIdentity, attribute, 1)


@pytest.mark.parametrize(
    "setting",
    [
        [
            "federation.strategy=fedadam",
            "federation.aggregator=fedavg",
            "federation.server_learning_rate=0.01",
        ],
        [
            "federation.strategy=fedyogi",
            "federation.aggregator=fedavg",
            "federation.server_learning_rate=0.01",
        ],
        ["federation.strategy=fedavgm", "federation.aggregator=fedavg", "federation.server_momentum=0.9"],
        ["federation.strategy=fedavg", "federation.aggregator=exact", "federation.error_feedback=true"],
        ["federation.strategy=fedavg", "federation.aggregator=exact", "simulation.client_ranks=[4, 8]"],
    ],
    ids=["fedadam", "fedyogi", "fedavgm", "exact-error-feedback", "exact-mixed-ranks"],
)
def test_resumed_round_is_bit_for_bit_the_uninterrupted_one(tmp_path, setting) -> None:
    cfg = load_config(overrides=[*BASE, *setting])
    run(cfg, tmp_path / "straight")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint")

    with pytest.raises(Crash):
        run(cfg, tmp_path / "crashed", crash_in_round=2)
    assert load_checkpoint(tmp_path / "crashed" / "checkpoint").round == 1
    run(cfg, tmp_path / "crashed")
    resumed = load_checkpoint(tmp_path / "crashed" / "checkpoint")

    assert straight.round == resumed.round == 2
    assert straight.adapter.keys() == resumed.adapter.keys()
    for key, value in straight.adapter.items():
        assert value.dtype == resumed.adapter[key].dtype and torch.equal(value, resumed.adapter[key]), key
    assert straight.strategy and straight.strategy.keys() == resumed.strategy.keys()
    for key, value in straight.strategy.items():
        assert torch.equal(value, resumed.strategy[key]), key


def test_a_checkpoint_with_state_the_optimiser_does_not_keep_is_refused_in_one_line(tmp_path) -> None:
    """FedAvgM's momentum as fedlora kept it before issue 18 (by position, not by adapter key)."""
    cfg = load_config(overrides=[*BASE, "federation.strategy=fedavgm", "federation.aggregator=fedavg"])
    with pytest.raises(Crash):
        run(cfg, tmp_path, crash_in_round=2)
    ckpt = load_checkpoint(tmp_path / "checkpoint")
    momentum = [k for k in ckpt.strategy if k.startswith("momentum/")]
    assert momentum
    for i, key in enumerate(momentum):
        ckpt.strategy[f"momentum_vector/{i:06d}"] = ckpt.strategy.pop(key)
    save_checkpoint(tmp_path / "checkpoint", ckpt)
    with pytest.raises(CheckpointError) as err:
        run(cfg, tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "checkpoint") in message
    assert "'momentum_vector' is not kept by federation.strategy fedavgm" in message


def test_a_node_whose_ledger_was_lost_is_refused_after_the_coordinator_restarts(tmp_path) -> None:
    """Issue 26, severe 2 (server side), with real DP training (Opacus) and the real restore: a virtual
    institution's ledger deleted while the coordinator is down reports a lower cumulative epsilon in
    the next round; the restarted coordinator still knows the old one and refuses it, naming the node."""
    dp = [*BASE, "privacy.enabled=true", "privacy.epsilon=8", "privacy.planned_rounds=3"]
    run(load_config(overrides=[*dp, "federation.rounds=2"]), tmp_path)
    before = load_checkpoint(tmp_path / "checkpoint").history[-1]["clients"]
    (tmp_path / "ledgers" / "client-0.json").unlink()
    run(load_config(overrides=[*dp, "federation.rounds=3"]), tmp_path)
    third = load_checkpoint(tmp_path / "checkpoint").history[-1]
    assert third["round"] == 3 and [c["node"] for c in third["clients"]] == [NODES[1]]
    assert [d["node"] for d in third["dropped"]] == [NODES[0]]
    spent = next(c[P.EPSILON] for c in before if c["node"] == NODES[0])
    assert third["dropped"][0]["reason"].startswith(f"node {NODES[0]} reports cumulative epsilon ")
    assert f"below the {spent:.4g} it reported before" in third["dropped"][0]["reason"]


class Killed(BaseException):
    """The whole site dies (kill -9, power): no handler or mod of the ClientApp sees it."""


DP = [
    *BASE,
    "privacy.enabled=true",
    "privacy.epsilon=8",
    "federation.rounds=3",
    "federation.strategy=fedavg",
    "federation.aggregator=fedavg",
]


class AuditedGrid(InProcessGrid):
    """Nodes that run the whole ClientApp (its audit and failure mods, so each keeps an audit log).
    ``kill`` = (round, when): in that round the coordinator dies with node 101 "training" (after its
    reservation, before its update left) or "after replies" (both updates left, none aggregated)."""

    def __init__(self, cfg: FedloraConfig, run_dir: Path, kill: tuple[int, str] | None = None) -> None:
        super().__init__(cfg, run_dir)
        self.kill = kill

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            absolute, node = int(msg.content[P.CONFIG][P.ROUND]), msg.metadata.dst_node_id
            setup = self.setups[node]
            app = build_client_app(lambda _context, setup=setup: setup)
            context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
            if self.kill == (absolute, "training") and node == NODES[0]:
                with mock.patch.object(LocalTrainer, "_step", side_effect=Killed("site lost mid-round")):
                    app(msg, context)
            replies.append(app(msg, context))
        if self.kill == (absolute, "after replies"):
            raise Killed("coordinator lost before aggregating")
        return replies


def round_entries(ledger: Path) -> list[int]:
    return [e["round"] for e in json.loads(ledger.read_text())["entries"] if e["round"] != STATISTICS_ROUND]


def test_a_round_killed_before_its_update_left_reuses_its_reservation_and_all_rounds_train(tmp_path) -> None:
    """Before issue 26 the re-sent round 2 was charged again and round 3 refused ('budget exhausted')."""
    cfg = load_config(overrides=DP)
    with pytest.raises(Killed):
        run_server(AuditedGrid(cfg, tmp_path, kill=(2, "training")), ServerSettings(cfg, tmp_path, 2))
    assert round_entries(ledger_file(tmp_path, 0)) == [1, 2]  # reserved, never sent

    run_server(AuditedGrid(cfg, tmp_path), ServerSettings(cfg, tmp_path, len(NODES)))

    history = json.loads((tmp_path / "history.json").read_text())
    assert [len(e["clients"]) for e in history[1:]] == [2, 2, 2], history
    for pid in range(len(NODES)):
        assert round_entries(ledger_file(tmp_path, pid)) == [1, 2, 3]
    spent = PrivacyLedger.from_config(cfg.privacy, ledger_file(tmp_path, 0)).spent
    assert spent == max(c[P.EPSILON] for c in history[-1]["clients"]) <= 8


def test_a_round_whose_updates_left_is_charged_again_and_a_starved_run_fails(tmp_path) -> None:
    """The updates of round 2 left before the coordinator died: re-running round 2 releases new
    noise and is charged; round 3 then finds every budget spent, and the coordinator says so and
    fails instead of reporting a completed run (the adapter of the rounds before is exported)."""
    cfg = load_config(overrides=DP)
    with pytest.raises(Killed):
        run_server(AuditedGrid(cfg, tmp_path, kill=(2, "after replies")), ServerSettings(cfg, tmp_path, 2))
    with pytest.raises(FedloraError) as err:
        run_server(AuditedGrid(cfg, tmp_path), ServerSettings(cfg, tmp_path, len(NODES)))
    message = str(err.value)
    assert "\n" not in message and "round 3 of 3 trained nothing" in message and "budget" in message
    for pid in range(len(NODES)):
        assert round_entries(ledger_file(tmp_path, pid)) == [1, 2, 2]
    assert (tmp_path / "adapter").is_dir()
