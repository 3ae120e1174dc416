"""End to end through Flower's simulation engine (Ray): real apps, real Opacus, real PEFT.

One module-scoped federation (3 tiny-BERT hospitals, 2 rounds, one client failing in round 2) is
then resumed for a third round; the tests read what it left behind, including the client-side
audit of every message that left a client.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
from flwr.app import Context
from peft import PeftModel
from safetensors.torch import load_file

from fedlora.client.app import ClientSetup, shared_data
from fedlora.client.ledger import PrivacyLedger
from fedlora.common import protocol as P
from fedlora.common.accounting import compose
from fedlora.common.adapter import adapter_state, shapes
from fedlora.common.config import load_config
from fedlora.common.model import build_base_model, build_model
from fedlora.server.checkpoint import load_checkpoint
from fedlora.simulations import cli as sim_cli
from fedlora.simulations import run as sim_run

pytestmark = [pytest.mark.slow, pytest.mark.integration]

OVERRIDES = [
    "model.source=tiny-bert",
    "data.max_length=48",
    "training.local_steps=4",
    "training.batch_size=16",
    "training.learning_rate=0.005",
    "training.head_learning_rate=0.01",
    # A generous budget: this federation tests the plumbing (DP on, real Opacus), not the recipe.
    "privacy.epsilon=100",
    "federation.rounds=2",
    "federation.min_clients=2",
    "federation.fraction_evaluate=0",
    "simulation.num_clients=3",
    "simulation.partition=iid",
    "privacy.planned_rounds=3",
]
FAILING = 2  # partition id of the client that raises in round 2


@dataclass(frozen=True)
class FailingInRoundTwo:
    """Wraps the simulation's setup: one virtual client raises while handling round 2."""

    inner: object

    def __call__(self, context: Context) -> ClientSetup:
        setup = self.inner(context)
        # Its ledger holds round 0 (the statistics) and round 1 by the time round 2 comes.
        if setup.client_id == FAILING and _rounds_seen(setup) >= 2:
            raise RuntimeError("simulated crash in the middle of round 2")
        return setup


def _rounds_seen(setup: ClientSetup) -> int:
    if not setup.ledger_path.exists():
        return 0
    return len(json.loads(setup.ledger_path.read_text())["entries"])


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    run_dir = tmp_path_factory.mktemp("sim")
    cfg = load_config(overrides=OVERRIDES)
    original = sim_run.build_client_app

    def failing_app(setup):
        return original(FailingInRoundTwo(setup))

    sim_run.build_client_app = failing_app
    try:
        sim_run.simulate(cfg, run_dir)
    finally:
        sim_run.build_client_app = original
    (run_dir / "after-two").mkdir()
    for name in ("history.json",):
        (run_dir / "after-two" / name).write_text((run_dir / name).read_text())
    two = load_checkpoint(run_dir / "checkpoint")
    torch.save(two.adapter, run_dir / "after-two" / "adapter.pt")
    sim_run.simulate(load_config(overrides=[*OVERRIDES, "federation.rounds=3"]), run_dir)
    return run_dir


def audit_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((run_dir / "audit").glob("*.jsonl")) for line in f.open()]


def test_global_loss_falls_and_rounds_complete(federation: Path) -> None:
    history = json.loads((federation / "after-two" / "history.json").read_text())
    assert [e["round"] for e in history] == [0, 1, 2]
    # Round 0 is the statistics head from every client's release; the LoRA rounds keep a loss well
    # below a uniform guess over the 8 conditions (at epsilon 100 they need not beat round 0's head).
    assert len(history[0]["clients"]) == 3 and all(c[P.STEPS] == 0 for c in history[0]["clients"])
    assert history[0]["central"]["loss"] < math.log(8) and history[2]["central"]["loss"] < math.log(8)
    assert len(history[1]["clients"]) == 3


def test_client_that_raises_is_dropped_and_round_completes(federation: Path) -> None:
    history = json.loads((federation / "after-two" / "history.json").read_text())
    round_two = history[2]
    assert len(round_two["clients"]) == 2
    assert len(round_two["dropped"]) == 1
    assert round_two["dropped"][0]["reason"] == "internal error"  # the detail stays with the client
    assert "simulated crash" not in (federation / "history.json").read_text()


def test_only_adapter_tensors_leave_clients(federation: Path) -> None:
    cfg = load_config(overrides=OVERRIDES)
    tokenizer, bundle = shared_data(cfg)
    expected = shapes(adapter_state(build_model(cfg.model, bundle.labels, len(tokenizer)).model))
    replies = [line for line in audit_lines(federation) if "arrays" in line]
    statistics = [line for line in replies if P.CLASS_SUMS in line["arrays"]["arrays"]]
    assert len(statistics) == 3  # round 0: every client once, and never again after the resume
    for line in statistics:
        assert set(line["arrays"]["arrays"]) == {P.CLASS_SUMS, P.CLASS_COUNTS}
        assert line["metrics"]["metrics"][P.NOISE_STD] > 0 and line["metrics"]["metrics"][P.STEPS] == 0
    replies = [line for line in replies if line not in statistics]
    assert len(replies) >= 3 * 2  # 3 clients in rounds 1 and 3, 2 in round 2
    for line in replies:
        assert set(line) <= {"time", "type", "arrays", "bytes", "metrics", "configs", "round", "received"}
        assert list(line["arrays"]) == ["arrays"]
        sent = {k: tuple(v["shape"]) for k, v in line["arrays"]["arrays"].items()}
        assert sent == {k: v for k, v in expected.items() if k in sent} and set(sent) == set(expected)
        assert all(isinstance(v, int | float) for v in line["metrics"]["metrics"].values())
        sent_metrics = line["metrics"]["metrics"]
        unnoised = [k for k in sent_metrics if k in P.EVALUATE_OPTIONAL or k.startswith(P.RECALL)]
        assert not unnoised  # nothing computed on the private data leaves without the opt-in
        assert line["configs"] == {"config": {"fingerprint": line["configs"]["config"]["fingerprint"]}}
        payload = sum(4 * torch.Size(s).numel() for s in expected.values())
        assert payload <= line["bytes"] <= payload + 128 * len(expected)  # fp32 values + .npy headers


def test_each_client_stays_within_budget_and_ledger_recomputes(federation: Path) -> None:
    cfg = load_config(overrides=OVERRIDES)
    ledgers = sorted((federation / "ledgers").glob("client-*.json"))
    assert len(ledgers) == 3
    for path in ledgers:
        ledger = PrivacyLedger(path, cfg.privacy.epsilon, cfg.privacy.delta, cfg.privacy.accountant)
        assert 0 < ledger.spent <= cfg.privacy.epsilon
        history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries]
        assert ledger.spent == pytest.approx(compose(cfg.privacy.accountant, history, cfg.privacy.delta))


def test_resume_continues_at_round_three_from_checkpoint(federation: Path) -> None:
    history = json.loads((federation / "history.json").read_text())
    assert [e["round"] for e in history] == [0, 1, 2, 3]
    assert load_checkpoint(federation / "checkpoint").round == 3
    round_three = [line for line in audit_lines(federation) if line.get("round") == 3 and "arrays" in line]
    assert len(round_three) == 3
    before = torch.load(federation / "after-two" / "adapter.pt")
    ledger_rounds = [
        [e["round"] for e in json.loads(p.read_text())["entries"]]
        for p in sorted((federation / "ledgers").glob("*.json"))
    ]
    assert [0, 1, 2, 3] in ledger_rounds  # statistics, then every round, numbered absolutely
    assert any(r == [0, 1, 3] for r in ledger_rounds)  # the one that crashed in round 2
    final = load_file(next((federation / "checkpoint").glob("round-*/adapter.safetensors")))
    assert any(not torch.equal(before[k], final[k]) for k in before)


def test_final_adapter_loads_with_peft(federation: Path) -> None:
    cfg = load_config(overrides=OVERRIDES)
    tokenizer, bundle = shared_data(cfg)
    base = build_base_model(cfg.model, bundle.labels, len(tokenizer))
    model = PeftModel.from_pretrained(base, federation / "adapter")
    ckpt = load_checkpoint(federation / "checkpoint")
    loaded = adapter_state(model)
    assert set(loaded) == set(ckpt.best)  # the exported adapter: the round best on validation
    for key, value in ckpt.best.items():
        torch.testing.assert_close(loaded[key], value)


@dataclass(frozen=True)
class AlwaysFailing:
    """Wraps the simulation's setup: every virtual client raises in every round."""

    inner: object

    def __call__(self, context: Context) -> ClientSetup:
        self.inner(context)
        raise RuntimeError("simulated crash in every round")


def test_simulate_exits_non_zero_when_every_reply_was_dropped(tmp_path, monkeypatch, capsys) -> None:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    original = sim_run.build_client_app
    monkeypatch.setattr(sim_run, "build_client_app", lambda setup: original(AlwaysFailing(setup)))
    config = tmp_path / "all-dropped.yaml"
    config.write_text("name: all-dropped\nmodel:\n  source: tiny-bert\n")
    sets = [*OVERRIDES, "federation.rounds=1", "simulation.num_clients=2", "federation.central_eval=false"]
    code = sim_cli.main(
        [str(config), "--out", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    # Round 0 (the statistics) counts: 2 replies there and 2 in round 1, all dropped.
    assert "all 4 replies of the 2 rounds were dropped" in " ".join(err.split())
    assert json.loads((tmp_path / "run" / "history.json").read_text())[1]["clients"] == []


def test_simulate_refuses_a_negative_round_count(tmp_path, capsys) -> None:
    code = sim_cli.main(["--out", str(tmp_path / "run"), "--set", "federation.rounds=-1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "federation.rounds" in err and "-1" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
