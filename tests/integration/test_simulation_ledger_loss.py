"""A virtual institution whose ledger file is deleted between rounds of a real simulation (Flower's
engine, Ray, real Opacus) refuses every later round as a ledger error instead of training on a budget
restarted from zero; the other institution goes on. Before issue 26 it trained rounds 2 and 3 and its
ledger ended below the epsilon it had already reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.client.audit import released
from fedlora.client.ledger import STATISTICS_ROUND
from fedlora.common.config import load_config
from fedlora.simulations import run as sim_run
from fedlora.simulations.virtual_client import ledger_file

pytestmark = [pytest.mark.slow, pytest.mark.integration]

OVERRIDES = [
    "model.source=tiny-bert",
    "data.max_length=32",
    "training.local_steps=2",
    "training.batch_size=16",
    "privacy.epsilon=8",
    "federation.rounds=3",
    "federation.min_clients=1",
    "federation.fraction_evaluate=0",
    "federation.central_eval=false",
    "simulation.num_clients=2",
    "simulation.partition=iid",
]
LOST = 0  # the virtual institution whose ledger is lost after round 1


def test_a_ledger_deleted_between_rounds_is_refused_and_its_epsilon_not_reset(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"

    def lose_after_round_one(entry: dict) -> None:
        if entry["round"] == 1:
            ledger_file(run_dir, LOST).unlink()

    sim_run.simulate(load_config(overrides=OVERRIDES), run_dir, on_round=lose_after_round_one)

    lines = [json.loads(line) for line in (run_dir / "audit" / f"client-{LOST}.jsonl").open()]
    trains = {line["round"]: line for line in lines if line["type"] == "train"}
    assert "error" not in trains[1]
    for server_round in (2, 3):
        assert trains[server_round].get("error") == {"code": 108, "category": "ledger error"}, server_round
    # Nothing was charged on a budget restarted from zero: no new ledger was started.
    assert not ledger_file(run_dir, LOST).exists()
    # What left: the round-0 statistics release and round 1, nothing after the loss.
    lost = released(run_dir / "audit" / f"client-{LOST}.jsonl")
    assert sorted(lost.steps) == [STATISTICS_ROUND, 1]
    assert lost.epsilon > 0
    # The other institution released its statistics and trained its three planned rounds.
    other = released(run_dir / "audit" / f"client-{1 - LOST}.jsonl")
    assert sorted(other.steps) == [STATISTICS_ROUND, 1, 2, 3]
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["round"] for e in history] == [STATISTICS_ROUND, 1, 2, 3]
    for entry in history[:2]:
        assert not entry.get("dropped"), entry
    for entry in history[2:]:
        assert [d["reason"] for d in entry["dropped"]] == ["ledger error"], entry
