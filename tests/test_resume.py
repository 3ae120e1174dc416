"""A federation resumed after a crash makes the same next round, bit for bit, as one that never stopped.

The real ServerApp body (server.app.run_server: strategy, checkpoint after every round, restore) drives
real ClientApp training (client.app.handle_train on tiny-BERT, DP off) through a grid that runs the
clients in this process. The clients are made deterministic (their RNGs seeded by node and round, the
replies returned in node order), so any difference between the two runs is the server's.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from fedlora.client.app import handle_train
from fedlora.common import protocol as P
from fedlora.common.config import FedloraConfig, load_config
from fedlora.common.errors import CheckpointError
from fedlora.server.app import ServerSettings, run_server
from fedlora.server.checkpoint import load_checkpoint, save_checkpoint
from fedlora.simulations.virtual_client import simulation_setup

pytestmark = pytest.mark.slow

NODES = (101, 202)
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


class Crash(Exception):
    """The coordinator dies while sending a round."""


class InProcessGrid:
    """Nodes whose ClientApp runs here: node ``NODES[i]`` serves partition ``i``."""

    def __init__(self, cfg: FedloraConfig, run_dir: Path, crash_in_round: int | None = None) -> None:
        self.setups = {
            node: simulation_setup(cfg, run_dir, SimpleNamespace(node_config={P.PARTITION_ID: i}))
            for i, node in enumerate(NODES)
        }
        self.crash_in_round = crash_in_round

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            absolute = int(msg.content[P.CONFIG][P.ROUND])
            if absolute == self.crash_in_round:
                raise Crash(f"killed in round {absolute}")
            node = msg.metadata.dst_node_id
            torch.manual_seed(node * 1000 + absolute)
            replies.append(handle_train(msg, self.setups[node]))
        return replies


@pytest.fixture(autouse=True)
def _inside_a_serverapp(monkeypatch) -> None:
    for attribute in ("_run_id", "_node_id", "_task_id"):  # Message() as inside a ServerApp process
        monkeypatch.setattr(TaskIdentity, attribute, 1)


def run(cfg: FedloraConfig, run_dir: Path, crash_in_round: int | None = None) -> None:
    grid = InProcessGrid(cfg, run_dir, crash_in_round)
    run_server(grid, ServerSettings(cfg=cfg, run_dir=run_dir, num_clients=len(NODES)))


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
