"""The empirical privacy audit on a tiny model: real Opacus, real PEFT, real ledger, canaries inside.

Setting: tiny-bert with LoRA r = 64 (about 16k trained parameters, room for 1000 nearly orthogonal
gradient canaries), 48 short rows, batch 8 (sample rate 1/6), 30 steps: an included canary is drawn
about 5 times, and missed altogether about 1 time in 240.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from flwr.supercore.task_identity import TaskIdentity

from fedlora.client import app as client_app
from fedlora.client import privacy_audit
from fedlora.client.app import handle_train
from fedlora.client.canaries import (
    CanarySpec,
    GradientCanaries,
    direction,
    input_canaries,
    new_spec,
    with_input_canaries,
)
from fedlora.client.cli import main as client_main
from fedlora.client.ledger import PrivacyLedger
from fedlora.client.privacy_audit import (
    AUDIT_LEDGER,
    LEAK_MESSAGE,
    RESULT_FILE,
    UNDER_NOISE_MESSAGE,
    run_local_audit,
)
from fedlora.client.trainer import LocalTrainer, trained_parameters
from fedlora.common import protocol as P
from fedlora.common.config import load_config
from fedlora.common.errors import ConfigError
from fedlora.common.workbench import prepare
from fedlora.server.app import ServerSettings, run_server
from fedlora.simulations.federated_audit import RESULT_FILE as FEDERATED_RESULT
from fedlora.simulations.federated_audit import audit_federation
from fedlora.simulations.report import audit_section
from fedlora.simulations.virtual_client import simulation_setup
from helpers.dp import seeded_audit

WORDS = {
    "cardio": "chest heart pain palpitations pressure stairs ankles",
    "resp": "cough breath wheezing sneezing phlegm nose lungs",
    "derm": "rash skin itchy blisters patches red flaky",
}
WHITE = 1000


@pytest.fixture
def rows_csv(tmp_path):
    g = torch.Generator().manual_seed(0)
    lines = ["text,label"]
    for i in range(48):
        label = list(WORDS)[i % 3]
        words = WORDS[label].split()
        picks = torch.randint(0, len(words), (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        lines.append(" ".join(words[int(j)] for j in picks) + "," + label)
    path = tmp_path / "rows.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def settings(rows_csv, tmp_path, **privacy) -> dict:
    return {
        "name": "audit-test",
        "model": {"source": "tiny-bert", "lora_r": 64},
        "data": {"path": str(rows_csv), "max_length": 32},
        "training": {"batch_size": 8, "local_steps": 10, "learning_rate": 0.01, "device": "cpu"},
        "privacy": {"accountant": "rdp", "ledger_path": str(tmp_path / "real-ledger.json"), **privacy},
        "federation": {"rounds": 3},
    }


def test_non_private_white_box_bound_is_large(make_config, rows_csv, tmp_path, monkeypatch):
    # 20 input canaries join the rows (sample rate 1/8): 60 steps, so that an included gradient
    # canary goes undrawn about 1 time in 3000 (seeded: the same draws in every run).
    seeded_audit(monkeypatch)
    cfg = make_config({**settings(rows_csv, tmp_path, enabled=False), "federation": {"rounds": 6}})
    result = run_local_audit(cfg, tmp_path / "audit", WHITE, 20)
    assert result.claimed_epsilon is None and not result.leaks
    white = result.white_box
    assert white.canaries == WHITE
    assert white.epsilon > 4, white
    assert white.epsilon <= white.ceiling
    assert result.black_box is not None and result.black_box.canaries == 20
    saved = json.loads((tmp_path / "audit" / RESULT_FILE).read_text())
    assert saved["white_box"]["epsilon"] == pytest.approx(white.epsilon)


@pytest.mark.parametrize("epsilon", [1.0, 4.0, 8.0])
def test_dp_bound_never_exceeds_the_claim(make_config, rows_csv, tmp_path, monkeypatch, epsilon):
    cfg = make_config(settings(rows_csv, tmp_path, epsilon=epsilon))
    for repeat in range(2):
        seeded_audit(monkeypatch, repeat)  # the bound holds at 95% confidence: a fixed draw per repeat
        out = tmp_path / f"audit-{repeat}"
        result = run_local_audit(cfg, out, WHITE, 0)
        # The claim is the audit's own ledger's: the whole planned run, near the budget.
        ledger = PrivacyLedger(out / AUDIT_LEDGER, epsilon, cfg.privacy.delta, "rdp")
        assert result.claimed_epsilon == pytest.approx(ledger.spent)
        assert epsilon * 0.9 < result.claimed_epsilon <= epsilon
        assert sum(e.steps for e in ledger.entries) == 30
        assert result.white_box.epsilon <= result.claimed_epsilon, result
        assert not result.leaks
    assert not (tmp_path / "real-ledger.json").exists()  # the institution's ledger is never touched


def noise_scaled(scale: float) -> type[LocalTrainer]:
    """A broken implementation: the ledger records its calibrated noise, the optimizer adds ``scale``
    times it."""

    class BrokenTrainer(LocalTrainer):
        def _make_private(self, loader):
            super()._make_private(loader)
            self.optimizer.noise_multiplier = self.noise_multiplier * scale

    return BrokenTrainer


NoiselessTrainer = noise_scaled(0.0)


def test_broken_trainer_is_caught_and_the_command_fails(rows_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(privacy_audit, "LocalTrainer", NoiselessTrainer)
    config = tmp_path / "institution.yaml"
    config.write_text(yaml.safe_dump(settings(rows_csv, tmp_path, epsilon=1.0)))
    out = tmp_path / "audit"
    code = client_main(["audit", str(config), "--out", str(out), "--black-box-canaries", "0"])
    assert code != 0
    err = capsys.readouterr().err
    assert LEAK_MESSAGE in err and len(err.strip().splitlines()[-1]) > len(LEAK_MESSAGE)
    saved = json.loads((out / RESULT_FILE).read_text())
    assert saved["claimed_epsilon"] <= 1.0
    assert saved["white_box"]["epsilon"] > 2 * saved["claimed_epsilon"]
    assert not (tmp_path / "real-ledger.json").exists()


def test_half_noise_is_caught_and_the_command_fails(rows_csv, tmp_path, monkeypatch, capsys):
    """Half the calibrated noise (true epsilon far above the claim): the epsilon bound alone cannot
    show it from one run, the noise check does (ratio 0.5, p far below its false alarm rate)."""
    monkeypatch.setattr(privacy_audit, "LocalTrainer", noise_scaled(0.5))
    config = tmp_path / "institution.yaml"
    config.write_text(yaml.safe_dump(settings(rows_csv, tmp_path, epsilon=1.0)))
    out = tmp_path / "audit"
    code = client_main(["audit", str(config), "--out", str(out), "--black-box-canaries", "0"])
    assert code != 0
    captured = capsys.readouterr()
    assert UNDER_NOISE_MESSAGE in captured.err and "p = " in captured.err
    assert "noise check" in captured.out
    noise = json.loads((out / RESULT_FILE).read_text())["noise"]
    assert noise["ratio"] == pytest.approx(0.5, abs=0.02)
    assert noise["p_value"] < noise["false_alarm"] == 1e-3 and noise["passed"] is False
    assert noise["samples"] == 30 * sum(p.numel() for p in trained_of(config))


def trained_of(config) -> list[torch.nn.Parameter]:
    bench = prepare(load_config(config))
    return list(trained_parameters(bench.built.model).values())


def canary_trainer(make_config, rows_csv, tmp_path, rows: int):
    """A DP trainer (clip 0.5, noise 1 on the ledger) with 20 white-box canaries, all drawn at every
    step, and a batch of the first ``rows`` training rows."""
    cfg = make_config(settings(rows_csv, tmp_path, max_grad_norm=0.5))
    bench = prepare(cfg)
    spec = new_spec(cfg, bench.built.model, len(bench.tokenizer), len(bench.labels), 20, 0)
    ledger = PrivacyLedger(tmp_path / "l.json", 8.0, cfg.privacy.delta, "rdp")
    ledger.noise_multiplier = 1.0
    trainer = LocalTrainer(cfg, bench.built.model, bench.data.train, torch.device("cpu"), ledger)
    hook = GradientCanaries(spec, cfg, 1.0, trainer.expected_batch)  # every included canary, every step
    data = bench.data.train
    batch = tuple(t[:rows] for t in (data.input_ids, data.attention_mask, data.labels))
    return spec, trainer, hook, batch


def test_noise_probe_recomputes_what_opacus_clipped_and_measures_its_noise(make_config, rows_csv, tmp_path):
    """The probe's own clipped sum (rows and canaries) equals Opacus' summed_grad, and the noise it
    measures is what Opacus added: exactly zero when Opacus adds none, sigma x C per coordinate when
    it adds sigma."""
    _, trainer, hook, batch = canary_trainer(make_config, rows_csv, tmp_path, 6)
    trainer.gradient_hook = hook
    params = trained_parameters(trainer.model)
    for sigma in (0.0, 2.0):
        trainer.optimizer.noise_multiplier = sigma
        trainer._step(batch)
        squares, samples = hook.noise.take()
        assert samples == sum(p.numel() for p in params.values())
        added = [(p.grad * trainer.expected_batch - p.summed_grad).flatten() for p in params.values()]
        noise = torch.cat(added)
        assert squares == pytest.approx(float(noise.double().square().sum()), rel=1e-4, abs=1e-8)
        assert (squares / samples) ** 0.5 == pytest.approx(sigma * 0.5, rel=0.05, abs=1e-5)
    trainer.close()


def test_canaries_follow_from_the_stored_seed(make_config, rows_csv, tmp_path):
    cfg = make_config(settings(rows_csv, tmp_path))
    bench = prepare(cfg)
    spec = new_spec(cfg, bench.built.model, len(bench.tokenizer), len(bench.labels), 100, 10)
    spec.save(tmp_path / "canaries.json")
    again = CanarySpec.load(tmp_path / "canaries.json")
    assert again == spec
    assert (again.white_box_included == spec.white_box_included).all()
    torch.testing.assert_close(direction(again, 7), direction(spec, 7))
    assert float(direction(spec, 7).norm()) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(direction(spec, 7) @ direction(spec, 8))) < 0.05  # nearly orthogonal
    rows = with_input_canaries(bench.data.train, spec)
    assert len(rows) == len(bench.data.train) + int(spec.black_box_included.sum())
    torch.testing.assert_close(input_canaries(again).input_ids, input_canaries(spec).input_ids)
    other = new_spec(cfg, bench.built.model, len(bench.tokenizer), len(bench.labels), 100, 10)
    assert other.seed != spec.seed


def test_included_canary_is_clipped_like_a_row(make_config, rows_csv, tmp_path):
    """Drawn canaries join the per-example gradients at twice the clipping norm; Opacus clips them to
    exactly the clipping norm, so they add clip x direction to the clipped sum."""
    spec, trainer, hook, batch = canary_trainer(make_config, rows_csv, tmp_path, 4)
    trainer.optimizer.noise_multiplier = 0.0
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0  # both steps see the same weights, so the same row gradients
    trainer._step(batch)
    plain = torch.cat([p.summed_grad.flatten() for _, p in sorted(trained_parameters(trainer.model).items())])
    trainer.gradient_hook = hook
    trainer._step(batch)
    with_canaries = torch.cat(
        [p.summed_grad.flatten() for _, p in sorted(trained_parameters(trainer.model).items())]
    )
    expected = 0.5 * sum(direction(spec, int(i)) for i in hook.members)
    torch.testing.assert_close(with_canaries - plain, expected, atol=1e-4, rtol=1e-3)
    trainer.close()


def test_what_the_audit_cannot_do_is_refused_before_training(make_config, rows_csv, tmp_path):
    cfg = make_config(settings(rows_csv, tmp_path, grad_sample_mode="ghost"))
    with pytest.raises(ConfigError, match="grad_sample_mode"):
        run_local_audit(cfg, tmp_path / "ghost", WHITE, 0)
    small = make_config({**settings(rows_csv, tmp_path), "model": {"source": "tiny-bert", "lora_r": 2}})
    with pytest.raises(ConfigError, match="white-box canaries in a space of"):
        run_local_audit(small, tmp_path / "small", WHITE, 0)
    assert not (tmp_path / "small" / AUDIT_LEDGER).exists()


class InProcessGrid:
    """The federation's clients run here, in node order: client.app.handle_train as in a simulation."""

    def __init__(self, cfg, run_dir, canaries):
        self.setups = {
            node: simulation_setup(cfg, run_dir, SimpleNamespace(node_config={P.PARTITION_ID: i}), canaries)
            for i, node in enumerate(NODES)
        }

    def get_node_ids(self):
        return list(NODES)

    def send_and_receive(self, messages, timeout=None):
        ordered = sorted(messages, key=lambda m: m.metadata.dst_node_id)
        return [handle_train(msg, self.setups[msg.metadata.dst_node_id]) for msg in ordered]


NODES = (101, 202)


def federated_config(rows_csv, *privacy: str):
    return load_config(
        overrides=[
            "model.source=tiny-bert",
            "model.lora_r=64",
            f"data.path={rows_csv}",
            "data.max_length=32",
            "training.local_steps=10",
            "training.batch_size=8",
            "training.learning_rate=0.01",
            *privacy,
            "federation.rounds=3",
            "federation.min_clients=2",
            "federation.fraction_evaluate=0",
            "federation.central_eval=false",
            "simulation.num_clients=2",
            "simulation.partition=iid",
        ]
    )


def test_federated_audit_checks_each_institutions_noise(rows_csv, tmp_path, monkeypatch):
    """Under DP each institution's noise check is kept over its rounds (a trainer per message) beside
    its canary sums; an implementation adding half the calibrated noise fails it at every institution,
    and the report's Audit section shows the check."""
    for attribute in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    monkeypatch.setattr(client_app, "LocalTrainer", noise_scaled(0.5))
    cfg = federated_config(rows_csv, "privacy.epsilon=2.0", "privacy.accountant=rdp")
    run_dir = tmp_path / "run"
    run_server(InProcessGrid(cfg, run_dir, (WHITE, 0)), ServerSettings(cfg, run_dir, len(NODES)))
    audits = audit_federation(cfg, run_dir)
    assert [a.client for a in audits] == [0, 1]
    for audit in audits:
        noise = audit.result.noise
        assert audit.result.failed and not noise.passed, audit
        assert noise.ratio == pytest.approx(0.5, abs=0.03)
        assert noise.samples % 30 == 0 and noise.samples > 30 * 10_000  # every coordinate of 30 steps
    section = audit_section(audits)
    assert "Noise check" in section and "| client-1 |" in section and "| NO |" in section
    assert json.loads((run_dir / FEDERATED_RESULT).read_text())[0]["result"]["noise"]["passed"] is False


def test_federated_audit_scores_each_institution(rows_csv, tmp_path, monkeypatch):
    """Each institution's canaries, re-made from its stored seed by a trainer per message, in every
    round, its sums of privatized gradients and sent updates kept beside them; without DP scored on
    the updates it sent, where they separate as in a local audit; the report's Audit section lists
    both institutions."""
    for attribute in ("_run_id", "_node_id", "_task_id"):  # Message() as inside a ServerApp process
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    cfg = federated_config(rows_csv, "privacy.enabled=false")
    run_dir = tmp_path / "run"
    run_server(InProcessGrid(cfg, run_dir, (WHITE, 10)), ServerSettings(cfg, run_dir, len(NODES)))
    audits = audit_federation(cfg, run_dir)
    assert [a.client for a in audits] == [0, 1]
    for audit in audits:
        assert audit.result.claimed_epsilon is None
        assert audit.result.white_box.canaries == WHITE and audit.result.black_box.canaries == 10
        assert audit.result.white_box.epsilon > 4, audit
        assert (run_dir / "canaries" / f"client-{audit.client}.sums.safetensors").exists()
    seeds = {json.loads((run_dir / "canaries" / f"client-{i}.json").read_text())["seed"] for i in (0, 1)}
    assert len(seeds) == 2
    section = audit_section(audits)
    assert section.startswith("## Audit") and "client-0" in section and "client-1" in section
    assert json.loads((run_dir / FEDERATED_RESULT).read_text())[1]["client"] == 1


HOSPITAL = Path(__file__).parents[2] / "configs" / "hospital-a.yaml"


def audit_hospital(tmp_path, monkeypatch, epsilon: float, scale: float, *overrides: str):
    """The shipped hospital-a config (its data, recipe and budget planned over its rounds) audited
    with an implementation that adds ``scale`` times the calibrated noise, on seeded draws: unseeded,
    the correct implementation failed the noise check at its false-alarm rate (p = 0.00088 in CI)."""
    monkeypatch.setattr(privacy_audit, "LocalTrainer", noise_scaled(scale))
    seeded_audit(monkeypatch)
    cfg = load_config(HOSPITAL, overrides=[f"privacy.epsilon={epsilon}", "training.device=cpu", *overrides])
    return run_local_audit(cfg, tmp_path / f"audit-{epsilon}-{scale}", WHITE, 0)


def assert_caught_and_passed(tmp_path, monkeypatch, epsilon: float, *overrides: str) -> None:
    correct = audit_hospital(tmp_path, monkeypatch, epsilon, 1.0, *overrides)
    assert not correct.failed, correct
    assert correct.noise.ratio == pytest.approx(1.0, abs=0.02)
    for scale in (0.5, 0.0):
        broken = audit_hospital(tmp_path, monkeypatch, epsilon, scale, *overrides)
        assert broken.failed and broken.under_noised, (scale, broken)
        assert broken.noise.ratio == pytest.approx(scale, abs=0.02)
        assert broken.noise.p_value < broken.noise.false_alarm
        # The claim the ledger makes is the calibrated one, whatever the optimizer added.
        assert broken.claimed_epsilon == pytest.approx(correct.claimed_epsilon)


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [1.0, 2.0, 4.0, 8.0])
def test_hospital_config_on_tiny_bert_catches_half_and_zero_noise(tmp_path, monkeypatch, epsilon):
    """Issue 26: the shipped hospital-a setup (600 reviews, batch 64, 10 rounds of 10 steps) on
    tiny-bert; about 30 s per audit on a shared 2-core machine."""
    assert_caught_and_passed(tmp_path, monkeypatch, epsilon, "model.source=tiny-bert")


@pytest.mark.slow
def test_hospital_config_with_minilm_catches_half_and_zero_noise(tmp_path, monkeypatch):
    """The same with the shipped MiniLM, one epsilon, one round of the planned ten (the budget planned
    for that one round): 10 steps of 64 reviews per audit, minutes on a shared 2-core CPU."""
    assert_caught_and_passed(tmp_path, monkeypatch, 2.0, "federation.rounds=1")
