"""The recipe planner against its documented rules, for tiny, small and large institutions at low and
high epsilon; the config's auto / manual modes; and `check` printing every value with its reason."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from opacus.accountants import create_accountant

from fedlora.client import recipe as R
from fedlora.client.cli import main
from fedlora.client.ledger import PrivacyLedger
from fedlora.client.trainer import LocalTrainer
from fedlora.common.accounting import calibrate_noise
from fedlora.common.cli_support import read_config
from fedlora.common.config import config_from_dict, describe, load_config
from fedlora.common.errors import ConfigError
from fedlora.common.workbench import prepare
from fedlora.configs import simulation as presets
from fedlora.simulations.virtual_client import with_peers

# name -> (rows, labels): a tiny clinic, a drug-review hospital, one of ten sites of an 11,500-row set.
INSTITUTIONS = {"tiny": (20, 4), "small": (53, 8), "large": (1150, 3)}
EPSILONS = {"low": 1.0, "high": 8.0}
ROUNDS, DELTA = 8, 1e-5
TRAINABLE = 75_000  # MiniLM's LoRA (r 8 on query and value) and a small head


def planned(rows: int, labels: int, epsilon: float, trainable: int = 1, head_values: int = 0, **training):
    cfg = config_from_dict(
        {
            "training": training,
            # RDP: the rules do not depend on the accountant, and it calibrates in a fraction of PRV's time.
            "privacy": {"epsilon": epsilon, "delta": DELTA, "planned_rounds": ROUNDS, "accountant": "rdp"},
        }
    )
    return R.plan(R.facts(cfg, rows, labels, trainable=trainable, head_values=head_values), cfg), cfg


def composed(history, delta=DELTA) -> float:
    """An accountant of our own, not the ledger's compose()."""
    accountant = create_accountant("rdp")
    accountant.history = list(history)
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize("level", EPSILONS)
@pytest.mark.parametrize("size", INSTITUTIONS)
def test_plan_follows_its_documented_rules(size, level):
    rows, labels = INSTITUTIONS[size]
    epsilon = EPSILONS[level]
    recipe, cfg = planned(rows, labels, epsilon)
    budget = cfg.training.examples_per_round
    batch = min(rows, budget // R.MIN_STEPS)
    assert recipe.batch_size.value == batch
    steps = min(R.MAX_STEPS, budget // batch)
    assert recipe.sample_rate.value == 1 / math.ceil(rows / batch)
    expected = recipe.sample_rate.value * rows
    scale = min(R.MAX_LR_SCALE, expected / R.REFERENCE_BATCH)
    assert recipe.learning_rate.value == pytest.approx(R.REFERENCE_LR * scale)
    assert recipe.head_learning_rate.value == pytest.approx(R.REFERENCE_HEAD_LR * scale)
    assert recipe.max_grad_norm.value == R.CLIP
    # The statistics at their documented share, the rounds' noise after them, and the fine-tune rule
    # (one trained value, one peer) recomputed here from its documented formula.
    share = calibrate_noise(R.STATISTICS_SHARE * epsilon, DELTA, "rdp", 1.0, 1)
    sigma = calibrate_noise(epsilon, DELTA, "rdp", expected / rows, ROUNDS * steps, ((share, 1.0, 1),))
    fine = math.sqrt(ROUNDS * steps) * expected / sigma >= R.MIN_RUN_SNR
    assert recipe.fine_tune.value == fine
    if fine:
        assert (recipe.local_steps.value, recipe.statistics_noise.value) == (steps, share)
        history = [
            *recipe.statistics_history(),
            (recipe.noise_multiplier.value, expected / rows, ROUNDS * recipe.local_steps.value),
        ]
    else:
        assert (recipe.local_steps.value, recipe.noise_multiplier.value) == (0, None)
        history = list(recipe.statistics_history())
    # Either way the plan spends the budget, within tolerance.
    assert epsilon - 0.02 <= composed(history) <= epsilon + 1e-6
    for name, choice in recipe.items():
        assert choice.reason, name


def test_institutions_get_what_their_size_and_budget_allow():
    tiny, _ = planned(*INSTITUTIONS["tiny"], 8.0)
    large, _ = planned(*INSTITUTIONS["large"], 8.0)
    large_low, _ = planned(*INSTITUTIONS["large"], 1.0)
    # A tiny institution trains on all its rows every step (sample rate 1), with more, smaller steps.
    assert tiny.sample_rate.value == 1.0 and tiny.local_steps.value > large.local_steps.value
    assert large.sample_rate.value < 0.1
    # A smaller budget buys more noise for the same plan.
    assert large_low.noise_multiplier.value > large.noise_multiplier.value
    for choice, source in (
        (large.batch_size, "Ponomareva"),
        (large.local_steps, "Li et al."),
        (large.learning_rate, "Li et al."),
        (large.max_grad_norm, "Li et al."),
    ):
        assert source in choice.reason


def test_values_the_config_sets_are_kept_and_the_rest_planned_around_them():
    recipe, _ = planned(1150, 3, 8.0, batch_size=100, learning_rate=0.01)
    assert (recipe.batch_size.value, recipe.learning_rate.value) == (100, 0.01)
    assert recipe.batch_size.reason == R.SET == recipe.learning_rate.reason
    assert recipe.local_steps.value == 192 // 100  # planned from the batch it was given
    assert recipe.head_learning_rate.reason != R.SET


def test_manual_recipe_is_todays_fixed_defaults():
    recipe, cfg = planned(1150, 3, 8.0, recipe="manual")
    assert (cfg.training.batch_size, cfg.training.local_steps, cfg.training.learning_rate) == (32, 10, 2e-3)
    assert cfg.privacy.max_grad_norm == 1.0
    assert recipe.batch_size.value == 32 and recipe.local_steps.value == 10
    assert recipe.head_learning_rate.value == 2e-3  # the LoRA rate, as before
    assert recipe.fine_tune.value and "local_steps" in recipe.fine_tune.reason  # manual steps are kept
    assert all("manual" in c.reason for n, c in recipe.items() if n in ("batch_size", "local_steps"))


def test_private_off_plans_no_noise_and_exact_statistics():
    cfg = config_from_dict({"privacy": {"enabled": False, "accountant": "rdp"}})
    recipe = R.plan(R.facts(cfg, 1150, 3), cfg)
    assert recipe.noise_multiplier.value is None and recipe.statistics_noise.value is None
    assert "exact statistics" in recipe.statistics_noise.reason and recipe.fine_tune.value
    assert R.applied(cfg, recipe).training.batch_size == recipe.batch_size.value


def test_config_modes_and_refusals():
    auto = config_from_dict({})
    assert auto.training.recipe == "auto" and auto.training.batch_size is None
    # The coordinator plans nothing: its learning rate (FedAdam's eta_l) takes the manual default.
    coordinator = config_from_dict({"data": {"labels": ["a", "b"]}}, persona="coordinator")
    assert coordinator.training.learning_rate == 2e-3
    with pytest.raises(ConfigError, match=r"training\.recipe: must be one of auto, manual"):
        config_from_dict({"training": {"recipe": "magic"}})
    assert "training.batch_size: an integer or null, default None (recipe manual: 32)" in describe(
        "institution"
    )


def cells(output: str) -> dict[str, str]:
    """Table rows as name -> value, joining the lines a long cell wraps onto."""
    rows: dict[str, str] = {}
    name = None
    for line in output.splitlines():
        parts = [c.strip() for c in line.split("│")[1:-1]]
        if len(parts) != 2:
            continue
        if parts[0]:
            name = parts[0]
            rows[name] = parts[1]
        elif name is not None:
            rows[name] += " " + parts[1]
    return rows


def test_check_prints_every_planned_value_with_its_reason(tmp_path: Path, capsys):
    config = tmp_path / "site.yaml"
    config.write_text(
        "model:\n  source: tiny-bert\ndata:\n  max_length: 16\n"
        f"privacy:\n  ledger_path: {tmp_path / 'ledger.json'}\n  planned_rounds: 2\n"
    )
    assert main(["check", str(config)]) == 0
    shown = cells(capsys.readouterr().out)
    cfg = config_from_dict({"model": {"source": "tiny-bert"}, "privacy": {"planned_rounds": 2}})
    trainable, head = 2312, 8 * 33  # tiny-bert's LoRA and its 8-label head (8 x (32 + 1) values)
    expected = R.plan(R.facts(cfg, 266, 8, trainable=trainable, head_values=head), cfg)  # triage: 266 rows
    assert shown["recipe"] == "auto"
    for name, choice in expected.items():
        value = (
            "-"
            if choice.value is None
            else (f"{choice.value:.4g}" if isinstance(choice.value, float) else str(choice.value))
        )
        assert shown[name.replace("_", " ")] == f"{value}: {choice.reason}"
    assert not (tmp_path / "ledger.json").exists()  # a check spends nothing


def test_check_prints_the_plan_the_trainer_runs(tmp_path: Path, capsys):
    """One privacy plan (client.trainer.privacy_plan): what check prints is what a trainer built on the
    same config, data and ledger runs, a value the config fixes included."""
    config = tmp_path / "site.yaml"
    config.write_text(
        "model:\n  source: tiny-bert\ndata:\n  max_length: 16\ntraining:\n  batch_size: 24\n"
        "  peers_per_round: 10\n"
        f"privacy:\n  ledger_path: {tmp_path / 'ledger.json'}\n  planned_rounds: 3\n"
    )
    assert main(["check", str(config)]) == 0
    shown = {name: value.split(":")[0] for name, value in cells(capsys.readouterr().out).items()}
    cfg = read_config(str(config), [], "institution")
    bench = prepare(cfg)
    ledger = PrivacyLedger.from_config(cfg.privacy)
    trainer = LocalTrainer(cfg, bench.built.model, bench.data.train, torch.device("cpu"), ledger)
    try:
        ran = trainer.cfg.training
        assert shown["fine tune"] == "True"
        assert shown["batch size"] == str(ran.batch_size) == "24"
        assert shown["sample rate"] == f"{trainer.sample_rate:.4g}"
        assert shown["local steps"] == str(ran.local_steps)
        assert shown["noise multiplier"] == f"{trainer.noise_multiplier:.4g}"
        assert shown["max grad norm"] == f"{trainer.cfg.privacy.max_grad_norm:.4g}"
        assert shown["learning rate"] == f"{ran.learning_rate:.4g}"
    finally:
        trainer.close()
    assert not (tmp_path / "ledger.json").exists()


def test_a_ledger_s_noise_is_kept_not_replanned():
    cfg = config_from_dict({"privacy": {"accountant": "rdp"}})
    recipe = R.plan(R.facts(cfg, 1150, 3), cfg, ledger_noise=1.234)
    assert recipe.noise_multiplier.value == 1.234 and "ledger" in recipe.noise_multiplier.reason


def test_a_budget_too_small_for_a_statistics_release_plans_none():
    # A quarter of epsilon 0.3 is below what one release at sample rate 1 can reach; the rounds are not.
    recipe, _ = planned(1150, 3, 0.3)
    assert recipe.statistics_noise.value is None and "no release" in recipe.statistics_noise.reason
    assert recipe.noise_multiplier.value > 0 and recipe.fine_tune.value


def test_too_few_rows_for_dp_sgd_put_the_whole_budget_on_the_statistics_and_say_why():
    """53 rows (a drug-review hospital), 10 peers, 75k trained values: the best-case signal-to-noise
    of the averaged updates is far below MIN_RUN_SNR, so no LoRA step is planned and the one release
    spends all of epsilon (its ledger noise is the statistics' own); a large institution with the
    compute to use its rows still fine-tunes."""
    small, _ = planned(53, 8, 8.0, trainable=TRAINABLE, peers_per_round=10)
    assert small.fine_tune.value is False
    assert "add nothing measurable" in small.fine_tune.reason and "< 10" in small.fine_tune.reason
    assert small.local_steps.value == 0 and small.noise_multiplier.value is None
    whole = calibrate_noise(8.0, DELTA, "rdp", 1.0, 1)
    assert small.statistics_noise.value == whole and "whole epsilon" in small.statistics_noise.reason
    assert small.calibration(ROUNDS) == (1.0, 1, ())  # the ledger calibrates exactly that release
    assert composed(small.statistics_history()) == pytest.approx(8.0, abs=0.02)
    large, _ = planned(20_000, 8, 8.0, trainable=TRAINABLE, peers_per_round=10, examples_per_round=2000)
    assert large.fine_tune.value and large.local_steps.value > 0
    assert large.statistics_noise.value == calibrate_noise(2.0, DELTA, "rdp", 1.0, 1)


MINILM_HEAD = 385  # values of one MiniLM head row: 384 weights and a bias


def test_where_lora_adds_nothing_many_rows_get_head_rounds_and_few_the_statistics_only_each_saying_why():
    """An institution of ten times MedMCQA's rows (7,680, 18 subjects, 10 peers) cannot make LoRA's
    80k values out of the noise, but the head's averaged gradient clears MIN_HEAD_SNR: head rounds, one noise
    for the release and every round (R + 1 steps at sample rate 1 spend epsilon, re-derived by an
    accountant of our own), every row a round, the head's clip. A 53-row hospital does not: statistics
    only, with both signal-to-noise figures in its reason."""
    many, _ = planned(7680, 18, 8.0, trainable=80_000, peers_per_round=10, head_values=18 * MINILM_HEAD)
    assert many.fine_tune.value is False and "DP-SGD of LoRA would add nothing" in many.fine_tune.reason
    assert many.head_rounds.value, many.head_rounds.reason
    assert f">= {R.MIN_HEAD_SNR:g}" in many.head_rounds.reason and "7680 rows" in many.head_rounds.reason
    sigma = calibrate_noise(8.0, DELTA, "rdp", 1.0, ROUNDS + 1)
    assert many.statistics_noise.value == many.noise_multiplier.value == sigma
    assert many.calibration(ROUNDS) == (1.0, ROUNDS + 1, ())
    assert composed([(sigma, 1.0, ROUNDS + 1)]) == pytest.approx(8.0, abs=0.02)
    assert (many.batch_size.value, many.sample_rate.value, many.local_steps.value) == (7680, 1.0, 0)
    assert many.max_grad_norm.value == 1.0
    few, _ = planned(53, 8, 8.0, trainable=80_000, peers_per_round=10, head_values=8 * MINILM_HEAD)
    assert few.fine_tune.value is False and few.head_rounds.value is False
    assert f"< {R.MIN_HEAD_SNR:g}" in few.head_rounds.reason and "53 rows" in few.head_rounds.reason
    assert "< 10" in few.fine_tune.reason and few.head_rounds.reason in few.fine_tune.reason
    assert few.calibration(ROUNDS) == (1.0, 1, ()) and few.local_steps.value == 0
    # A config that fixes its LoRA steps keeps them, head rounds or not.
    kept, _ = planned(768, 18, 8.0, trainable=80_000, peers_per_round=10, head_values=18 * 385, local_steps=3)
    assert kept.fine_tune.value and not kept.head_rounds.value


def test_a_person_level_institution_gets_no_head_rounds_which_clip_rows():
    """Head rounds clip each row's gradient; with data.privacy_unit a person's many rows would then
    move the sum by many clips: the planner keeps such an institution to the statistics."""
    cfg = config_from_dict(
        {
            "training": {"peers_per_round": 10},
            "privacy": {"epsilon": 8.0, "delta": DELTA, "planned_rounds": ROUNDS, "accountant": "rdp"},
        }
    )
    rows = R.facts(cfg, 7680, 18, trainable=80_000, head_values=18 * MINILM_HEAD)
    assert R.plan(rows, cfg).head_rounds.value
    persons = R.facts(cfg, 7680, 18, 7000, 7680 / 7000, trainable=80_000, head_values=18 * MINILM_HEAD)
    recipe = R.plan(persons, cfg)
    assert recipe.head_rounds.value is False and "not each person's" in recipe.head_rounds.reason
    assert recipe.local_steps.value == 0 and recipe.calibration(ROUNDS) == (1.0, 1, ())


def test_check_prints_the_head_rounds_decision_and_why(tmp_path: Path, capsys):
    config = tmp_path / "site.yaml"
    config.write_text(
        "model:\n  source: tiny-bert\ndata:\n  max_length: 16\n"
        "training:\n  peers_per_round: 1000\n  examples_per_round: 6\n"
        f"privacy:\n  ledger_path: {tmp_path / 'ledger.json'}\n  planned_rounds: 2\n"
    )
    assert main(["check", str(config)]) == 0
    shown = cells(capsys.readouterr().out)
    assert shown["head rounds"].startswith("True: head rounds' signal-to-noise")
    assert shown["fine tune"].startswith("False") and shown["local steps"].startswith(
        "0: no LoRA steps: head rounds"
    )
    rounds = [int(k.split(":")[0]) for k in shown["epsilon per row after round"].split(", ")]
    assert rounds[-1] == 2 and float(shown["epsilon per row after round"].split(": ")[-1]) <= 8.0
    assert not (tmp_path / "ledger.json").exists()


def test_the_default_preset_leaves_the_recipe_to_the_planner_which_skips_lora_for_its_hospitals():
    """configs/simulation/hospitals.yaml pinned batch 64 x 3 steps, so its hospitals kept DP-SGD
    at a signal-to-noise of 0.3-0.9; left to the planner, a 53-row hospital of 5 spends its budget on
    the statistics."""
    cfg = with_peers(load_config(str(Path(presets.__file__).parent / "hospitals.yaml"), (), "simulation"))
    assert cfg.training.local_steps is None and cfg.training.batch_size is None
    recipe = R.plan(R.facts(cfg, 53, 8, trainable=TRAINABLE), cfg)
    assert recipe.fine_tune.value is False and "add nothing measurable" in recipe.fine_tune.reason
    assert "whole epsilon" in recipe.statistics_noise.reason


def test_without_a_round_0_the_rounds_get_the_whole_budget():
    """train-local (LocalTrainer round_zero False) and federation.statistics_first false: no
    statistics release is planned, so the planned rounds alone spend epsilon."""
    cfg = config_from_dict({"privacy": {"accountant": "rdp", "epsilon": 8.0}}, source="<test>")
    alone = R.plan(R.facts(cfg, 1150, 3, trainable=TRAINABLE, round_zero=False), cfg)
    assert alone.statistics_noise.value is None and "no round 0" in alone.statistics_noise.reason
    assert alone.calibration(ROUNDS)[2] == ()
    federated = R.plan(R.facts(cfg, 1150, 3, trainable=TRAINABLE), cfg)
    assert federated.statistics_noise.value is not None
    off = config_from_dict(
        {"privacy": {"accountant": "rdp", "epsilon": 8.0}, "federation": {"statistics_first": False}},
        source="<test>",
    )
    assert R.plan(R.facts(off, 1150, 3, trainable=TRAINABLE), off).statistics_noise.value is None


def test_under_secure_aggregation_the_head_snr_counts_the_sums_noise_once(tmp_path: Path, capsys):
    """K peers adding full noise give their summed head gradient sqrt(K) sigma C; under secure aggregation
    with m guaranteed shares the sum carries sqrt(K / m) sigma C: sqrt(m) times the signal-to-noise,
    and head rounds planned where the plain path falls short. Check says which noise it assumed."""
    cfg = config_from_dict(
        {"training": {"peers_per_round": 10}, "privacy": {"epsilon": 8.0, "planned_rounds": ROUNDS}}
    )
    fed = cfg.federation
    secure = dataclasses.replace(cfg, federation=dataclasses.replace(fed, secure_aggregation=True))
    tolerant = dataclasses.replace(
        secure, federation=dataclasses.replace(secure.federation, secagg_dropouts=1, secagg_colluders=1)
    )
    head = 18 * MINILM_HEAD
    plain_inst, secure_inst, tolerant_inst = (
        R.facts(c, 2304, 18, trainable=80_000, head_values=head) for c in (cfg, secure, tolerant)
    )
    assert (plain_inst.shares, secure_inst.shares, tolerant_inst.shares) == (None, 10, 8)
    sigma = R.head_noise(plain_inst)
    plain = R.head_snr(plain_inst, sigma)
    assert R.head_snr(secure_inst, sigma) == pytest.approx(plain * math.sqrt(10))
    assert R.head_snr(tolerant_inst, sigma) == pytest.approx(plain * math.sqrt(8))
    assert plain < R.MIN_HEAD_SNR <= R.head_snr(secure_inst, sigma)
    assert not R.plan(plain_inst, cfg).head_rounds.value
    secure_plan = R.plan(secure_inst, secure).head_rounds
    assert secure_plan.value
    assert "secure aggregation: 10 peers' shares summed, 10 guaranteed" in secure_plan.reason

    config = tmp_path / "site.yaml"
    settings = (
        "model:\n  source: tiny-bert\ndata:\n  max_length: 16\n"
        "training:\n  peers_per_round: 1000\n  examples_per_round: 6\n"
        f"privacy:\n  ledger_path: {tmp_path / 'ledger.json'}\n  planned_rounds: 2\n"
    )
    config.write_text(settings)
    assert main(["check", str(config)]) == 0
    assert "each of 1000 peers adds its full noise" in cells(capsys.readouterr().out)["head rounds"]
    config.write_text(settings + "federation:\n  secure_aggregation: true\n  secagg_dropouts: 2\n")
    assert main(["check", str(config)]) == 0
    shown = cells(capsys.readouterr().out)["head rounds"]
    assert shown.startswith("True")
    assert "secure aggregation: 1000 peers' shares summed, 998 guaranteed" in shown


def test_check_says_what_secure_aggregation_sums_and_that_lora_rounds_keep_full_local_noise(tmp_path, capsys):
    """Issue 28: only one-noisy-step releases go through the secure sum with a share of the noise;
    multi-step local DP-SGD keeps its full local noise and reaches the coordinator unmasked."""
    config = tmp_path / "site.yaml"
    for peers, examples in ((1500, 3), (3000, 6)):  # head rounds; then enough for LoRA rounds
        config.write_text(
            "model:\n  source: tiny-bert\ndata:\n  max_length: 16\n"
            f"training:\n  peers_per_round: {peers}\n  examples_per_round: {examples}\n"
            f"privacy:\n  ledger_path: {tmp_path / 'ledger.json'}\n  planned_rounds: 2\n"
            "federation:\n  secure_aggregation: true\n"
        )
        assert main(["check", str(config)]) == 0
        shown = cells(capsys.readouterr().out)
        summed = shown["summed securely"]
        assert summed.startswith("round 0's statistics")
        if shown["fine tune"].startswith("True"):
            assert "keep the full local noise" in summed and "head round" not in summed
        else:
            assert shown["head rounds"].startswith("True")
            assert "every head round's gradient sum" in summed and "LoRA" not in summed
    assert shown["fine tune"].startswith("True")  # the second config planned LoRA rounds
