"""The audit of head rounds under secure aggregation (simulations.head_round_audit): each institution
adds only a share of a head round's noise, so the check is on each round's unmasked sum less the
institutions' exact clipped sums, against the claimed sigma C. The real server body drives the real
ClientApps of three virtual institutions in this process (helpers.secagg) whose planner chooses head
rounds (tiny-BERT, the drug reviews' 8 classes: 264 values a round). A correct run passes; one
institution adding no share (its noise monkeypatched away) is caught and fails in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedlora.client import head_rounds as H
from fedlora.common.config import FedloraConfig, config_from_dict
from fedlora.common.errors import FedloraError
from fedlora.common.head_gradient import length
from fedlora.common.noise_check import samples_to_detect
from fedlora.server.app import ServerSettings, run_server
from fedlora.simulations.head_round_audit import (
    SECURE_RESULT_FILE,
    audit_head_rounds,
    audit_secure_head_rounds,
    head_sum_recorder,
    require_head_noise,
)
from fedlora.simulations.report import audit_section
from helpers.secagg import NODES, SecAggGrid, inside_a_serverapp

ROUNDS = 4
VALUES = length(8, 32)  # the drug reviews' 8 classes on tiny-bert's 32-wide head
# one of 3 shares missing (std ratio sqrt(2/3)) needs samples_to_detect(sqrt(2/3)) = 467 values: 4 rounds
# of 264 hold more than twice that


@pytest.fixture(autouse=True)
def _inside_a_serverapp(monkeypatch) -> None:
    inside_a_serverapp(monkeypatch)


def config() -> FedloraConfig:
    return config_from_dict(
        {
            "model": {"source": "tiny-bert"},
            "data": {"max_length": 16},
            "training": {"peers_per_round": 100, "examples_per_round": 6, "device": "cpu"},
            "privacy": {"accountant": "rdp", "epsilon": 8.0},
            "federation": {
                "rounds": ROUNDS,
                "min_clients": 3,
                "fraction_evaluate": 0,
                "central_eval": False,
                "secure_aggregation": True,
            },
            "simulation": {"num_clients": 3, "partition": "iid"},
        }
    )


def audited(cfg: FedloraConfig, run_dir: Path) -> None:
    """A federation whose ServerApp hands each secure head round's sum to the audit's recorder and whose
    institutions' observers keep their exact clipped sums, as an audited simulation's do."""
    grid = SecAggGrid(cfg, run_dir, canaries=(8, 0))
    run_server(grid, ServerSettings(cfg, run_dir, len(NODES), on_secure_head=head_sum_recorder(run_dir)))
    history = json.loads((run_dir / "history.json").read_text())
    assert [e.get("head_gradients", 0) for e in history] == [0] + [3] * ROUNDS


def test_the_secure_head_sums_carry_the_claimed_noise_and_one_missing_share_is_caught(tmp_path, monkeypatch):
    cfg = config()
    torch.manual_seed(0)
    audited(cfg, tmp_path / "honest")
    audit = audit_secure_head_rounds(cfg, tmp_path / "honest")
    assert audit is not None and audit.rounds == list(range(1, ROUNDS + 1)) and audit.skipped == []
    assert audit.check.passed and audit.check.samples == ROUNDS * VALUES
    assert audit.check.samples >= 2 * samples_to_detect(math.sqrt(2 / 3))
    assert audit.samples_to_catch_missing_share == samples_to_detect(math.sqrt(2 / 3))
    assert audit.honest == 3
    assert audit_head_rounds(cfg, tmp_path / "honest") == []  # no institution's share alone is checked
    require_head_noise([], tmp_path / SECURE_RESULT_FILE, audit)  # passes: no error
    assert "Secure aggregation, head rounds (1, 2, 3, 4)" in audit_section([], None, [], audit)

    real, calls = H.noisy, []

    def first_adds_none(value, noise_std, generator=None):
        calls.append(noise_std)
        silent = len(calls) % len(NODES) == 1  # the first institution of every round
        return real(value, 0.0 if silent else noise_std, generator)

    monkeypatch.setattr(H, "noisy", first_adds_none)
    audited(cfg, tmp_path / "silent")
    audit = audit_secure_head_rounds(cfg, tmp_path / "silent")
    claimed = audit.check.calibrated_std
    assert claimed == pytest.approx(calls[1] * math.sqrt(3))  # sigma C (the share std x sqrt(m)), ledgers
    assert not audit.check.passed and audit.check.ratio == pytest.approx(math.sqrt(2 / 3), abs=0.08)
    with pytest.raises(FedloraError) as err:
        require_head_noise([], tmp_path / SECURE_RESULT_FILE, audit)
    assert "an institution added less than its share" in str(err.value) and "\n" not in str(err.value)
    assert "| NO |" in audit_section([], None, [], audit)
