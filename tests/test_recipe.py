"""The recipe planner against its documented rules, for tiny, small and large institutions at low and
high epsilon; the config's auto / manual modes; and `check` printing every value with its reason."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from opacus.accountants import create_accountant

from fedlora.client import recipe as R
from fedlora.client.cli import main
from fedlora.client.ledger import calibrate_noise
from fedlora.common.config import config_from_dict, describe
from fedlora.common.errors import ConfigError

# name -> (rows, labels): a tiny clinic, a drug-review hospital, one of ten sites of an 11,500-row set.
INSTITUTIONS = {"tiny": (20, 4), "small": (53, 8), "large": (1150, 3)}
EPSILONS = {"low": 1.0, "high": 8.0}
ROUNDS, DELTA = 8, 1e-5


def planned(rows: int, labels: int, epsilon: float, **training):
    cfg = config_from_dict(
        {
            "training": training,
            # RDP: the rules do not depend on the accountant, and it calibrates in a fraction of PRV's time.
            "privacy": {"epsilon": epsilon, "delta": DELTA, "planned_rounds": ROUNDS, "accountant": "rdp"},
        }
    )
    return R.plan(R.facts(cfg, rows, labels), cfg), cfg


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
    assert recipe.local_steps.value == min(R.MAX_STEPS, budget // batch)
    assert recipe.sample_rate.value == 1 / math.ceil(rows / batch)
    expected = recipe.sample_rate.value * rows
    scale = min(R.MAX_LR_SCALE, expected / R.REFERENCE_BATCH)
    assert recipe.learning_rate.value == pytest.approx(R.REFERENCE_LR * scale)
    assert recipe.head_learning_rate.value == pytest.approx(R.REFERENCE_HEAD_LR * scale)
    assert recipe.max_grad_norm.value == R.CLIP
    # The head-start rule, recomputed here from its documented constants.
    sigma_h = calibrate_noise(R.HEAD_START_SHARE * epsilon, DELTA, "rdp", 1.0, 1)
    dp = R.ASSUMED_GAP * rows / labels >= R.MIN_SIGNAL_TO_NOISE * sigma_h * math.sqrt(2)
    assert recipe.head_start.value == ("dp" if dp else "shared")
    # The noise spends the budget: head start (if any) and every planned step, within tolerance.
    history = [
        *recipe.head_start_history(),
        (recipe.noise_multiplier.value, expected / rows, ROUNDS * recipe.local_steps.value),
    ]
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
    # Only the large institution at the high budget can afford to start its head from its data.
    assert (tiny.head_start.value, large.head_start.value, large_low.head_start.value) == (
        "shared",
        "dp",
        "shared",
    )
    assert "Tramer & Boneh" in large.head_start.reason and "free" in tiny.head_start.reason
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
    assert recipe.head_start.value == "shared"  # auto means no DP start under manual
    assert all("manual" in c.reason for n, c in recipe.items() if n in ("batch_size", "local_steps"))


def test_private_off_plans_no_noise_and_no_head_start():
    cfg = config_from_dict({"privacy": {"enabled": False, "accountant": "rdp"}})
    recipe = R.plan(R.facts(cfg, 1150, 3), cfg)
    assert recipe.noise_multiplier.value is None and recipe.head_start.value == "shared"
    assert R.applied(cfg, recipe).training.batch_size == recipe.batch_size.value


def test_config_modes_and_refusals():
    auto = config_from_dict({})
    assert auto.training.recipe == "auto" and auto.training.batch_size is None
    # The coordinator plans nothing: its learning rate (FedAdam's eta_l) takes the manual default.
    coordinator = config_from_dict({"data": {"labels": ["a", "b"]}}, persona="coordinator")
    assert coordinator.training.learning_rate == 2e-3
    with pytest.raises(ConfigError, match=r"training\.head_start: 'dp'.*privacy\.enabled"):
        config_from_dict({"training": {"head_start": "dp"}, "privacy": {"enabled": False}}, source="x.yaml")
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
    expected = R.plan(R.facts(cfg, 266, 8), cfg)  # the drug-review triage demo: 266 rows, 8 labels
    assert shown["recipe"] == "auto"
    for name, choice in expected.items():
        value = (
            "-"
            if choice.value is None
            else (f"{choice.value:.4g}" if isinstance(choice.value, float) else str(choice.value))
        )
        assert shown[name.replace("_", " ")] == f"{value}: {choice.reason}"
    assert not (tmp_path / "ledger.json").exists()  # a check spends nothing


def test_a_ledger_s_noise_is_kept_not_replanned():
    cfg = config_from_dict({"privacy": {"accountant": "rdp"}})
    recipe = R.plan(R.facts(cfg, 1150, 3), cfg, ledger_noise=1.234)
    assert recipe.noise_multiplier.value == 1.234 and "ledger" in recipe.noise_multiplier.reason


def test_a_budget_too_small_for_a_head_start_plans_none_and_refuses_an_explicit_one():
    # A quarter of epsilon 0.3 is below what one release at sample rate 1 can reach; the rounds are not.
    recipe, _ = planned(1150, 3, 0.3)
    assert recipe.head_start.value == "shared" and "no release" in recipe.head_start.reason
    assert recipe.noise_multiplier.value > 0
    with pytest.raises(ConfigError, match=r"training\.head_start: 'dp' on 25% of the budget"):
        planned(1150, 3, 0.3, head_start="dp")
