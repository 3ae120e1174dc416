"""Round 0 under secure aggregation through Flower's simulation engine (Ray): the protocol's state kept
in each virtual institution's context between its five messages, whichever actor handles them, signed
by the identities the simulation made in its run folder."""

from __future__ import annotations

import json

import pytest

from fedlora.client.ledger import PrivacyLedger
from fedlora.common import protocol as P
from fedlora.common.config import load_config
from fedlora.common.secure_aggregation.identity import load_roster
from fedlora.simulations import run as sim_run
from fedlora.simulations.virtual_client import ledger_file

pytestmark = [pytest.mark.slow, pytest.mark.integration]

OVERRIDES = [
    "model.source=tiny-bert",
    "data.max_length=32",
    "training.local_steps=1",
    "training.batch_size=8",
    "privacy.epsilon=8",
    "federation.rounds=1",
    "federation.min_clients=3",
    "federation.fraction_evaluate=0",
    "federation.central_eval=false",
    "federation.secure_aggregation=true",
    "federation.secagg_threshold=2",
    "federation.secagg_dropouts=1",
    "simulation.num_clients=3",
    "simulation.partition=iid",
]


def test_a_simulation_sums_round_0_securely_with_noise_shares(tmp_path):
    cfg = load_config(overrides=OVERRIDES)
    sim_run.simulate(cfg, tmp_path)
    history = json.loads((tmp_path / "history.json").read_text())
    round0 = history[0]
    assert len(round0["clients"]) == 3 and round0["aggregation"]["secagg_survivors"] == 3
    assert len(history[1]["clients"]) == 3  # the LoRA round followed
    for pid in range(3):
        entry = PrivacyLedger.from_config(cfg.privacy, ledger_file(tmp_path, pid)).entries[0]
        assert entry.share_noise_multiplier is not None and entry.epsilon_alone > entry.epsilon
        lines = (tmp_path / "audit" / f"client-{pid}.jsonl").read_text().splitlines()
        stages = [json.loads(line)["configs"][P.CONFIG].get(P.SECAGG_STAGE) for line in lines[:5]]
        assert stages == list(P.SECAGG_STAGES)
    roster = load_roster(tmp_path / "identities" / "roster.yaml")
    assert sorted(roster.names.values()) == ["client-0", "client-1", "client-2"]
    keys = [tmp_path / "identities" / f"client-{pid}.key" for pid in range(3)]
    assert all(key.stat().st_mode & 0o077 == 0 for key in keys)  # owner-only
    assert "distributed noise" in (tmp_path / "adapter" / "README.md").read_text()


HEAD_ROUNDS = [
    "model.source=tiny-bert",
    "data.max_length=16",
    "training.peers_per_round=100",
    "training.examples_per_round=6",
    "privacy.epsilon=8",
    "privacy.accountant=rdp",
    "federation.rounds=2",
    "federation.min_clients=3",
    "federation.fraction_evaluate=0",
    "federation.central_eval=false",
    "federation.secure_aggregation=true",
    "simulation.num_clients=3",
    "simulation.partition=iid",
]


def test_a_simulation_sums_its_head_rounds_securely(tmp_path):
    """Head rounds (the planner's choice here) under secure aggregation over Ray: each institution joins,
    then its four stages, whichever actor handles them; the card says so."""
    cfg = load_config(overrides=HEAD_ROUNDS)
    sim_run.simulate(cfg, tmp_path)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [e.get("head_gradients", 0) for e in history] == [0, 3, 3]
    assert all(e["aggregation"]["secagg_survivors"] == 3 for e in history[1:])
    for pid in range(3):
        heads = PrivacyLedger.from_config(cfg.privacy, ledger_file(tmp_path, pid)).entries[1:]
        assert [e.round for e in heads] == [1, 2] and all(e.epsilon_alone > e.epsilon for e in heads)
    assert "Under secure aggregation in rounds 1, 2" in (tmp_path / "adapter" / "README.md").read_text()
