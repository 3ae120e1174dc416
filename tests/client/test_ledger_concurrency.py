"""Two real processes spending from one ledger at once can never overspend it together.

Each worker builds its own LocalTrainer on tiny-bert (reading the ledger, as a fresh process does),
waits at a barrier so that both have read it before either trains, then trains rounds until the
budget refuses one, printing every step it really ran. The budget affords a little more than one
worker's plan, far less than both. What the ledger recorded must be exactly Opacus' composition of
every step that ran, in both processes, and within the budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from opacus.accountants import create_accountant

pytestmark = pytest.mark.slow

SIGMA, BATCH, ROWS, STEPS, ROUNDS, DELTA = 1.0, 4, 16, 3, 6, 1e-5
RATE = BATCH / ROWS

WORKER = f"""
import json, sys, time
from pathlib import Path
import torch
from fedlora.client.ledger import PrivacyLedger
from fedlora.client.trainer import LocalTrainer
from fedlora.common.config import config_from_dict
from fedlora.common.data import TokenizedDataset
from fedlora.common.errors import BudgetExceeded
from fedlora.common.model import build_model

torch.set_num_threads(1)
ledger_path, budget, barrier, name = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
cfg = config_from_dict(
    {{
        "model": {{"source": "tiny-bert"}},
        "training": {{"device": "cpu", "batch_size": {BATCH}, "local_steps": {STEPS}}},
        "privacy": {{"epsilon": budget, "delta": {DELTA}, "accountant": "rdp"}},
    }},
    source="<worker>",
)
g = torch.Generator().manual_seed(0)
labels = torch.arange({ROWS}) % 2
ids = torch.randint(1000, 1400, ({ROWS}, 8), generator=g) + 500 * labels[:, None]
data = TokenizedDataset(ids, torch.ones_like(ids), labels)
ledger = PrivacyLedger(ledger_path, budget, {DELTA}, "rdp")
ledger.noise_multiplier = {SIGMA}  # as read from an earlier round: calibration is tested elsewhere
model = build_model(cfg.model, ("a", "b"), 3000).model
trainer = LocalTrainer(cfg, model, data, torch.device("cpu"), ledger)
(barrier / f"{{name}}.ready").touch()
while not (barrier / "go").exists():
    time.sleep(0.01)


def on_step(step, _loss):
    print(json.dumps({{"step": step, "noise": trainer.optimizer.noise_multiplier}}), flush=True)
    time.sleep(0.05)  # slow enough that the two workers' rounds interleave


for r in range(1, {ROUNDS} + 1):
    try:
        trainer.train_round(r, on_step=on_step)
    except BudgetExceeded as err:
        print(json.dumps({{"refused": r, "why": str(err)}}), flush=True)
        break
"""


def rdp_epsilon(steps: int) -> float:
    accountant = create_accountant(mechanism="rdp")
    accountant.history = [(SIGMA, RATE, steps)]
    return float(accountant.get_epsilon(delta=DELTA))


def test_two_processes_cannot_overspend_one_ledger(tmp_path):
    one_plan, both_plans = rdp_epsilon(ROUNDS * STEPS), rdp_epsilon(2 * ROUNDS * STEPS)
    budget = rdp_epsilon((ROUNDS + 2) * STEPS) * (1 + 1e-9)  # one plan and two rounds more, not both
    assert one_plan < budget < both_plans
    ledger, barrier = tmp_path / "ledger.json", tmp_path / "barrier"
    barrier.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(ledger), repr(budget), str(barrier), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    try:
        deadline = time.monotonic() + 300
        while not all((barrier / f"{n}.ready").exists() for n in "ab"):
            assert all(w.poll() is None for w in workers), [w.communicate() for w in workers]
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
        assert not ledger.exists()  # both have read the (empty) ledger; neither has trained
        (barrier / "go").touch()
        outputs = [w.communicate(timeout=300) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for w, (_out, err) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, err
    lines = [json.loads(line) for out, _ in outputs for line in out.splitlines() if line.startswith("{")]
    ran = [line for line in lines if "step" in line]
    refused = [line for line in lines if "refused" in line]
    assert {line["noise"] for line in ran} == {SIGMA}
    # Every step that ran, in either process, composed independently by Opacus.
    independent = rdp_epsilon(len(ran))
    recorded = json.loads(ledger.read_text())
    assert recorded["entries"][-1]["epsilon"] == pytest.approx(independent, rel=1e-9)
    assert sum(e["steps"] for e in recorded["entries"]) == len(ran)
    assert independent <= budget
    # The budget ran out: a round was refused, and only the rounds that fit ran.
    assert refused and all("privacy budget" in r["why"] for r in refused)
    assert len(ran) == ROUNDS * STEPS + 2 * STEPS
