"""The DP head start: its sensitivity, its post-processing, and its spend in the ledger, re-derived by
an accountant of our own and composed with the rounds within the budget."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import create_accountant

from fedlora.client.head_start import class_sums, head_rows, noisy_head
from fedlora.client.ledger import HEAD_START_ROUND, PrivacyLedger, calibrate_noise
from fedlora.client.trainer import LocalTrainer
from fedlora.common.adapter import adapter_state
from fedlora.common.errors import BudgetExceeded, ConfigError
from fedlora.common.model import build_model

CPU = torch.device("cpu")
LABELS = ("a", "b", "c")
EPSILON, ROUNDS, STEPS, BATCH = 8.0, 2, 2, 8


def head(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in adapter_state(model).items() if ".classifier." in k}


def test_without_noise_the_head_is_the_normalised_class_means_and_the_log_shares():
    sums = torch.tensor([[3.0, 4.0], [0.0, -2.0]], dtype=torch.float64)
    counts = torch.tensor([6.0, 2.0], dtype=torch.float64)
    weight, bias = noisy_head(sums, counts, 0.0, head_scale=20.0)
    assert torch.allclose(weight, torch.tensor([[12.0, 16.0], [0.0, -20.0]]))
    assert torch.allclose(bias, torch.log(torch.tensor([0.75, 0.25])))


def test_one_row_moves_the_released_sums_and_counts_by_sqrt_2(make_config, vocab_size, toy_classification):
    cfg = make_config()
    model = build_model(cfg.model, LABELS, vocab_size).model
    data = toy_classification(12, 3)
    shape = head(model)["base_model.model.classifier.weight"].shape
    assert head_rows(model) == 3
    sums, counts = class_sums(model, data, shape, CPU, 5)
    assert counts.tolist() == [4.0, 4.0, 4.0]
    for row in (0, 7):
        rest = data.subset([i for i in range(len(data)) if i != row])
        fewer, fewer_counts = class_sums(model, rest, shape, CPU, 5)
        moved = torch.cat([(sums - fewer).flatten(), counts - fewer_counts]).norm().item()
        assert moved == pytest.approx(math.sqrt(2), abs=1e-6)  # a unit vector and a count of 1
    assert model.training  # restored after the eval-mode pass


def trainer_for(cfg, vocab_size, data, ledger_path):
    model = build_model(cfg.model, LABELS, vocab_size).model
    p = cfg.privacy
    return LocalTrainer(cfg, model, data, CPU, PrivacyLedger(ledger_path, p.epsilon, p.delta, p.accountant))


def test_dp_head_start_is_charged_composed_and_rederived(
    make_config, vocab_size, toy_classification, tmp_path
):
    ledger_path = tmp_path / "ledger.json"
    cfg = make_config(
        {
            "training": {"head_start": "dp", "batch_size": BATCH, "local_steps": STEPS},
            "privacy": {"epsilon": EPSILON, "planned_rounds": ROUNDS, "ledger_path": str(ledger_path)},
        }
    )
    data = toy_classification(64, 3)
    trainer = trainer_for(cfg, vocab_size, data, ledger_path)
    before = head(trainer.model)
    sigma_h = trainer.recipe.head_start_noise.value
    assert sigma_h == calibrate_noise(0.25 * EPSILON, cfg.privacy.delta, "prv", 1.0, 1)
    first = trainer.train_round(1)
    entries = PrivacyLedger(ledger_path, EPSILON, cfg.privacy.delta, "prv").entries
    start, round1 = entries
    assert (start.round, start.noise_multiplier, start.sample_rate, start.steps) == (
        HEAD_START_ROUND,
        sigma_h,
        1.0,
        1,
    )
    assert (round1.round, round1.noise_multiplier, round1.steps) == (1, trainer.noise_multiplier, STEPS)
    assert not all(torch.equal(before[k], v) for k, v in head(trainer.model).items())

    def independent(history):
        accountant = create_accountant("prv")
        accountant.history = history
        return accountant.get_epsilon(delta=cfg.privacy.delta)

    assert start.epsilon == pytest.approx(independent([(sigma_h, 1.0, 1)]), abs=1e-6)
    both = [(sigma_h, 1.0, 1), (trainer.noise_multiplier, trainer.sample_rate, STEPS)]
    assert first.epsilon == pytest.approx(independent(both), abs=1e-6)
    trainer.close()

    # Another process (a new message) resumes the ledger: no second head start, the last planned round
    # lands on the budget and never above it, and one more round is refused.
    again = trainer_for(cfg, vocab_size, data, ledger_path)
    last = again.train_round(2)
    rounds = [(trainer.noise_multiplier, trainer.sample_rate, STEPS * ROUNDS)]
    assert last.epsilon == pytest.approx(independent([(sigma_h, 1.0, 1), *rounds]), abs=1e-6)
    assert EPSILON - 0.05 <= last.epsilon <= EPSILON
    assert [e.round for e in again.ledger.entries] == [HEAD_START_ROUND, 1, 2]
    with pytest.raises(BudgetExceeded):
        again.train_round(3)
    again.close()


def test_a_budget_the_head_start_alone_exhausts_is_refused_before_anything_trains():
    with pytest.raises(ConfigError, match=r"privacy\.epsilon: 0\.5 is below"):
        calibrate_noise(0.5, 1e-5, "rdp", 0.1, 100, ((0.3, 1.0, 1),))
