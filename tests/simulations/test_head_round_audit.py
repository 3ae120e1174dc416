"""Head rounds in a federation: the real server body drives the real ClientApps of two virtual
institutions in this process (helpers.grid) whose planner chooses head rounds (tiny-BERT, many peers,
a compute cap that leaves LoRA nothing). The model card states what left each institution in those
rounds and at what noise; ``--audit``'s noise check covers them (simulations.head_round_audit): a
correct implementation passes, one adding no noise to head rounds fails in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from flwr.supercore.task_identity import TaskIdentity

from fedlora.client import head_rounds as H
from fedlora.client.ledger import PrivacyLedger
from fedlora.common.config import FedloraConfig, config_from_dict
from fedlora.common.errors import FedloraError
from fedlora.common.head_gradient import CLIP, length
from fedlora.simulations.head_round_audit import RESULT_FILE, audit_head_rounds, require_head_noise
from fedlora.simulations.report import audit_section
from fedlora.simulations.virtual_client import ledger_file
from helpers.grid import run

ROUNDS = 2
LABELS = ("derm", "neuro", "resp")
WIDTH = 32  # tiny-bert's hidden size


@pytest.fixture(autouse=True)
def _inside_a_serverapp(monkeypatch) -> None:
    for attribute in ("_run_id", "_node_id", "_task_id"):  # Message() as inside a ServerApp process
        monkeypatch.setattr(TaskIdentity, attribute, 1)


def head_round_config(root: Path) -> FedloraConfig:
    words = {"derm": "red rash", "neuro": "bad headache", "resp": "dry cough"}
    rows = [{"text": f"note {i}: {words[LABELS[i % 3]]}", "label": LABELS[i % 3]} for i in range(60)]
    path = root / "train.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return config_from_dict(
        {
            "model": {"source": "tiny-bert"},
            "data": {"path": str(path), "max_length": 16},
            "training": {"peers_per_round": 8000, "examples_per_round": 2, "device": "cpu"},
            "privacy": {"accountant": "rdp", "epsilon": 8.0},
            "federation": {
                "rounds": ROUNDS,
                "min_clients": 2,
                "fraction_evaluate": 0,
                "central_eval": False,
            },
            "simulation": {"num_clients": 2, "partition": "iid"},
        }
    )


def audited_run(root: Path) -> tuple[FedloraConfig, Path]:
    cfg = head_round_config(root)
    run_dir = root / "run"
    run(cfg, run_dir, canaries=(8, 0))
    history = json.loads((run_dir / "history.json").read_text())
    assert [e.get("head_gradients", 0) for e in history] == [0] + [2] * ROUNDS  # both, every round
    return cfg, run_dir


def test_a_head_round_run_states_them_in_its_card_and_passes_the_noise_check(tmp_path):
    cfg, run_dir = audited_run(tmp_path)
    card = (run_dir / "adapter" / "README.md").read_text()
    sigmas = set()
    for pid in range(2):
        ledger = PrivacyLedger.from_config(cfg.privacy, ledger_file(run_dir, pid))
        sigmas |= {e.noise_multiplier for e in ledger.entries if e.round >= 1}
        assert f"| client-{pid} | {ledger.spent:.4f} |" in card
    (sigma,) = sigmas  # one noise for round 0 and every head round; both partitions plan the same
    shown = f"{sigma:.4g}"
    for fact in (
        f"- head rounds: in {ROUNDS} rounds (1, 2) the recipe planner chose head rounds (4 replies in all)",
        "so LoRA was not trained in them",
        "plus Gaussian noise of std sigma x C",
        "with its epsilon and no row count",
        f"At noise multiplier sigma {shown} (the ledgers' entries for these rounds), clip C 1 (the planner's",
        "- what a head round's reply carries in the clear: epsilon, steps, train-seconds, noise-std (no row",
        "composed with round 0 by its accountant: the epsilons below cover them",
        "- mechanism: no DP-SGD step of LoRA ran",
    ):
        assert fact in card, fact

    audits = audit_head_rounds(cfg, run_dir)
    assert [a.client for a in audits] == [0, 1]
    for audit in audits:
        assert audit.check.passed
        assert audit.check.samples == ROUNDS * length(len(LABELS), WIDTH)
        assert audit.check.calibrated_std == pytest.approx(sigma * CLIP)  # the ledger's sigma x C
    require_head_noise(audits, run_dir / RESULT_FILE)  # passes: no error
    assert json.loads((run_dir / RESULT_FILE).read_text())[0]["check"]["passed"] is True
    section = audit_section([], None, audits)
    assert "No canary membership test covers them" in section
    assert f"Power: {ROUNDS * length(len(LABELS), WIDTH)} values" in section


def test_head_rounds_that_add_no_noise_fail_the_audit_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(H, "noisy", lambda value, noise_std, generator=None: value)
    cfg, run_dir = audited_run(tmp_path)
    audits = audit_head_rounds(cfg, run_dir)
    assert len(audits) == 2 and not any(a.check.passed for a in audits)
    with pytest.raises(FedloraError, match=r"client-0's head rounds carry noise of std 0 = 0\.000 x") as err:
        require_head_noise(audits, run_dir / RESULT_FILE)
    assert "\n" not in str(err.value) and "client-1's head rounds" in str(err.value)
