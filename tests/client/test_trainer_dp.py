"""DP-SGD through LocalTrainer's own Opacus wrapper, checked against brute force.

The guard for opacus #820 (LoRA updates silently corrupted): the clipped, summed gradient Opacus
computes must equal a per-example loop (forward alone, backward, clip the whole vector, sum).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math

import pandas as pd
import pytest
import torch
from peft import get_peft_model

from fedlora.client.ledger import PrivacyLedger
from fedlora.client.trainer import LocalTrainer
from fedlora.common.adapter import adapter_state
from fedlora.common.config import DataConfig
from fedlora.common.data import IGNORE_INDEX, tokenize_causal_lm
from fedlora.common.errors import ConfigError
from fedlora.common.model import build_base_model, build_model, lora_config, target_modules
from fedlora.common.scoring import causal_lm_loss, evaluate, forward_loss, trim
from helpers.dp import (
    CPU,
    LABELS,
    assert_clipped_sum,
    causal_dataset,
    norm_of,
    per_example_grads,
    perturbed_model,
    preset_ledger,
    trainable,
)


def dp_trainer(make_config, model, data, tmp_path, sigma=1.0, **privacy):
    cfg = make_config(
        {"training": {"batch_size": 4, "local_steps": 5}, "privacy": {"accountant": "rdp", **privacy}}
    )
    return cfg, LocalTrainer(cfg, model, data, CPU, preset_ledger(tmp_path / "ledger.json", cfg, sigma))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_clipped_sum_equals_brute_force_loop(make_config, vocab_size, toy_classification, tmp_path, mode):
    cfg0 = make_config()
    model = perturbed_model(cfg0, vocab_size)
    reference = copy.deepcopy(model)
    data = toy_classification(n=16, num_labels=len(LABELS), seed=3)
    batch = tuple(t[:6] for t in (data.input_ids, data.attention_mask, data.labels))
    assert len(set(data.attention_mask[:6].sum(1).tolist())) > 1, "want varied lengths in the batch"

    per = per_example_grads(reference, batch)
    norms = [norm_of(g) for g in per]
    clip = math.sqrt(min(norms) * max(norms))  # between the smallest and the largest
    above, below = sum(n > clip for n in norms), sum(n < clip for n in norms)
    assert above >= 2 and below >= 2, (norms, clip)
    expected = {
        name: sum(g[name] * min(1.0, clip / n) for g, n in zip(per, norms, strict=True)) for name in per[0]
    }
    # The LoRA matrices themselves (not only the head) carry gradient: #820 was about them.
    for kind in ("lora_A", "lora_B", "classifier"):
        assert any(kind in k and float(v.norm()) > 1e-3 for k, v in expected.items()), kind

    _, trainer = dp_trainer(make_config, model, data, tmp_path, max_grad_norm=clip, grad_sample_mode=mode)
    optimizer = trainer.optimizer
    assert type(optimizer).__name__.startswith("DPOptimizer")
    assert optimizer.max_grad_norm == pytest.approx(clip)
    optimizer.noise_multiplier = 0.0
    assert trainer._step(batch) is not None  # the trainer's own step: trim, forward, backward, step

    assert_clipped_sum(trainer, expected, rtol=1e-5)
    assert optimizer.expected_batch_size == 4


def test_noise_std_is_sigma_clip_over_batch(make_config, vocab_size, toy_classification, tmp_path):
    cfg0 = make_config()
    model = perturbed_model(cfg0, vocab_size)
    data = toy_classification(n=16, num_labels=len(LABELS), seed=4)
    sigma = 1.3
    cfg, trainer = dp_trainer(make_config, model, data, tmp_path, sigma=sigma, max_grad_norm=0.5)
    # The trainer hands the ledger's noise to Opacus.
    assert trainer.noise_multiplier == sigma
    assert trainer.optimizer.noise_multiplier == sigma
    expected_std = sigma * cfg.privacy.max_grad_norm / cfg.training.batch_size

    deviations = []
    for start in (0, 4, 8):
        batch = tuple(t[start : start + 4] for t in (data.input_ids, data.attention_mask, data.labels))
        trainer._step(batch)
        ebs = trainer.optimizer.expected_batch_size
        for p in trainer.optimizer.params:
            # Applied gradient minus the noise-free one (the clipped sum, scaled the same way).
            deviations.append((p.grad - p.summed_grad / ebs).flatten())
    deviation = torch.cat(deviations).double()
    assert deviation.numel() > 5000
    assert float(deviation.std()) == pytest.approx(expected_std, rel=0.10)
    assert abs(float(deviation.mean())) < 5 * expected_std / math.sqrt(deviation.numel())


def test_classification_loss_falls(make_config, vocab_size, toy_classification):
    cfg = make_config(
        {
            "training": {"batch_size": 8, "learning_rate": 0.03, "local_steps": 40},
            "privacy": {"enabled": False},
        }
    )
    data = toy_classification(n=32, num_labels=2)
    model = build_model(cfg.model, ("a", "b"), vocab_size).model
    trainer = LocalTrainer(cfg, model, data, CPU)
    before = evaluate(trainer.model, "classification", data, CPU)
    result = trainer.train_round(1)
    after = evaluate(trainer.model, "classification", data, CPU)
    assert result.steps == 40 and result.epsilon is None and math.isfinite(result.loss)
    assert after["loss"] < 0.7 * before["loss"], (before, after)
    assert after["accuracy"] > before["accuracy"]
    assert after["accuracy"] >= 0.9


@pytest.mark.slow
def test_causal_lm_loss_falls(make_config, vocab_size, tokenizer):
    cfg = make_config(
        {
            "model": {"source": "tiny-llama", "task": "causal-lm"},
            "training": {"batch_size": 8, "learning_rate": 0.03, "local_steps": 40},
            "privacy": {"enabled": False},
        }
    )
    data = causal_dataset(tokenizer)
    assert (data.labels != IGNORE_INDEX).sum(1).min() >= 2  # the response carries the loss
    model = build_model(cfg.model, (), vocab_size).model
    trainer = LocalTrainer(cfg, model, data, CPU)
    before = evaluate(trainer.model, "causal-lm", data, CPU)
    trainer.train_round(1)
    after = evaluate(trainer.model, "causal-lm", data, CPU)
    # Only q/v LoRA on a random base behind a frozen tied head and RMSNorm: the loss can't go far
    # below log(vocab) = 10.3, but it falls clearly (measured 10.35 -> 9.48).
    assert after["loss"] < before["loss"] - 0.5, (before, after)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_step_and_count(make_config, vocab_size, toy_classification, tmp_path, mode):
    cfg = make_config(
        {
            "training": {"batch_size": 1, "local_steps": 30},
            "privacy": {"grad_sample_mode": mode, "accountant": "rdp"},
        }
    )
    data = toy_classification(n=4)
    ledger = preset_ledger(tmp_path / "ledger.json", cfg, sigma=2.0)
    trainer = LocalTrainer(cfg, build_model(cfg.model, ("a", "b"), vocab_size).model, data, CPU, ledger)
    snapshots, losses = [adapter_state(trainer.model)], []

    def on_step(_step, loss):
        losses.append(loss)
        snapshots.append(adapter_state(trainer.model))

    result = trainer.train_round(1, on_step=on_step)
    empty = [i for i, loss in enumerate(losses) if math.isnan(loss)]
    assert empty and len(empty) < 30, "the seed should draw some empty and some full batches"
    assert result.steps == 30
    assert ledger.entries[-1].steps == 30
    assert PrivacyLedger(tmp_path / "ledger.json", cfg.privacy.epsilon, cfg.privacy.delta, "rdp").spent > 0
    # An empty step is a real DP step: the noise moves the adapter.
    i = empty[0]
    assert any(not torch.equal(snapshots[i][k], snapshots[i + 1][k]) for k in snapshots[i])


def test_an_empty_first_poisson_batch_is_no_news_on_the_log(
    make_config, vocab_size, toy_classification, tmp_path, caplog
):
    """Opacus logs a warning when a loader's first batch is empty; the trainer steps on it as on any
    empty batch (noise only), so the line is dropped (on a command's stderr it broke the one-line
    error convention: train-local printed it above its budget error)."""
    cfg = make_config({"training": {"batch_size": 1, "local_steps": 1}, "privacy": {"accountant": "rdp"}})
    data = toy_classification(n=4)
    for seed in range(200):
        torch.manual_seed(seed)
        ledger = preset_ledger(tmp_path / f"ledger-{seed}.json", cfg)
        trainer = LocalTrainer(cfg, build_model(cfg.model, ("a", "b"), vocab_size).model, data, CPU, ledger)
        with caplog.at_level(logging.WARNING):
            first = trainer._next_batch()
        trainer.close()
        if len(first[0]) == 0:
            break
    assert len(first[0]) == 0, "some seed draws an empty first batch (each does with p = 0.32)"
    assert not [r for r in caplog.records if "batch is empty" in r.getMessage()]
    assert not logging.getLogger("opacus.data_loader").filters


def test_causal_lm_loss_is_a_per_sequence_mean(tokenizer):
    torch.manual_seed(0)
    width, vocab = 12, 50
    logits = torch.randn(2, width, vocab)
    labels_short = torch.full((2, width), IGNORE_INDEX)
    labels_long = labels_short.clone()
    labels_short[0, 4:7] = torch.tensor([3, 4, 5])
    labels_long[0, 4:7] = labels_short[0, 4:7]
    labels_short[1, 3:5] = torch.tensor([6, 7])
    labels_long[1, 3:11] = torch.tensor([6, 7, 8, 9, 10, 11, 12, 13])

    def grad_row0(loss_fn, labels):
        x = logits.clone().requires_grad_(True)
        loss_fn(x, labels).backward()
        return x.grad[0]

    # Example 0's gradient does not change when example 1 gets longer.
    torch.testing.assert_close(
        grad_row0(causal_lm_loss, labels_short), grad_row0(causal_lm_loss, labels_long), atol=0, rtol=0
    )

    # Independent: the mean over examples of each example's mean token loss (shifted by one).
    def manual(x, labels):
        per = []
        for row in range(x.shape[0]):
            logp = torch.log_softmax(x[row], dim=-1)
            terms = [-logp[t - 1, labels[row, t]] for t in range(1, width) if labels[row, t] != IGNORE_INDEX]
            per.append(torch.stack(terms).mean())
        return torch.stack(per).mean()

    for labels in (labels_short, labels_long):
        torch.testing.assert_close(causal_lm_loss(logits, labels), manual(logits, labels))

    # The check above can fail: a batch token-mean (Hugging Face's loss) does couple the examples.
    def token_mean(x, labels):
        return torch.nn.functional.cross_entropy(
            x[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
        )

    assert not torch.allclose(grad_row0(token_mean, labels_short), grad_row0(token_mean, labels_long))


def test_causal_lm_example_gradient_independent_of_batch_mates(make_config, vocab_size, tokenizer):
    """Through the tiny Llama and real tokenization. With a per-sequence mean the batch loss of two
    examples is (loss_0 + loss_k) / 2, so 2 * grad(batch) - grad(k alone) = grad(0 alone), whether
    example k's response is short or long (a token mean would weight example 0 by its share)."""
    cfg = make_config({"model": {"source": "tiny-llama", "task": "causal-lm"}})
    model = perturbed_model(cfg, vocab_size, labels=(), scale=0.05)
    frame = pd.DataFrame(
        {
            "prompt": ["first question", "second question", "second question"],
            "response": ["yes", "no", "no, and here is a much longer answer to the second question"],
        }
    )
    data = tokenize_causal_lm(frame, DataConfig(), tokenizer, "frame")
    counted = (data.labels != IGNORE_INDEX).sum(1)
    assert counted[2] >= 3 * counted[1]
    params = list(trainable(model).values())

    def grad(rows):
        batch = trim(tuple(t[rows] for t in (data.input_ids, data.attention_mask, data.labels)))
        loss, _ = forward_loss(model, "causal-lm", batch)
        return torch.autograd.grad(loss, params)

    alone = grad([0])
    for mate in (1, 2):
        together, other = grad([0, mate]), grad([mate])
        for g_alone, g_together, g_other in zip(alone, together, other, strict=True):
            torch.testing.assert_close(2 * g_together - g_other, g_alone, atol=2e-6, rtol=1e-4)


def test_trainer_refuses_dp_without_ledger_and_ghost_for_causal_lm(
    make_config, vocab_size, toy_classification, tmp_path
):
    cfg = make_config()
    data = toy_classification(n=8)
    with pytest.raises(ConfigError, match="ledger"):
        LocalTrainer(cfg, build_model(cfg.model, ("a", "b"), vocab_size).model, data, CPU, None)
    causal = make_config(
        {"model": {"source": "tiny-llama", "task": "causal-lm"}, "privacy": {"grad_sample_mode": "ghost"}}
    )
    with pytest.raises(ConfigError, match="ghost"):
        LocalTrainer(
            causal,
            build_model(causal.model, (), vocab_size).model,
            data,
            CPU,
            PrivacyLedger(tmp_path / "ledger.json", 8, 1e-5, "prv"),
        )


def test_dp_sampling_is_unpredictable_but_baselines_follow_the_seed(
    make_config, vocab_size, toy_classification, tmp_path
):
    """Privacy amplification by subsampling assumes nobody can know which rows a step drew: under
    DP the same training.seed must not reproduce the batches; non-private runs stay reproducible."""
    data = toy_classification(n=16)

    def draws(private: bool, run: int) -> list[list[int]]:
        cfg = make_config(
            {"training": {"batch_size": 4, "local_steps": 6, "seed": 5}, "privacy": {"enabled": private}}
        )
        ledger = preset_ledger(tmp_path / f"l{private}{run}.json", cfg) if private else None
        trainer = LocalTrainer(cfg, build_model(cfg.model, ("a", "b"), vocab_size).model, data, CPU, ledger)
        return [next(trainer._batches)[0][:, 1].tolist() for _ in range(12)]

    assert draws(True, 0) != draws(True, 1)
    assert draws(False, 0) == draws(False, 1)


@pytest.mark.parametrize("delta", [1 / 16, 0.5])
def test_trainer_refuses_delta_not_below_one_over_rows(
    make_config, vocab_size, toy_classification, tmp_path, delta
):
    cfg = make_config({"privacy": {"delta": delta, "accountant": "rdp"}})
    model = build_model(cfg.model, ("a", "b"), vocab_size).model
    with pytest.raises(ConfigError) as info:
        LocalTrainer(cfg, model, toy_classification(n=16), CPU, preset_ledger(tmp_path / "l.json", cfg))
    message = str(info.value)
    assert message.startswith(f"privacy.delta: {delta:g}") and "1/16" in message and "\n" not in message
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("adapter_name", ["default", "local"])
def test_proximal_pull_reaches_every_adapter_tensor(
    make_config, vocab_size, toy_classification, adapter_name
):
    """FedProx's pull, with learning rate x mu = 1, puts every trained tensor (LoRA and the head)
    exactly on the anchor: the trainer finds each parameter's key in PEFT's own state dict, whatever
    the adapter is named."""
    lr = 0.01
    cfg = make_config(
        {
            "training": {"batch_size": 8, "learning_rate": lr, "head_learning_rate": lr, "local_steps": 2},
            "privacy": {"enabled": False},
        }
    )
    base = build_base_model(cfg.model, ("a", "b"), vocab_size)
    for param in base.parameters():
        param.requires_grad_(False)
    layout = lora_config(cfg.model, target_modules(cfg.model, base))
    model = get_peft_model(base, layout, adapter_name=adapter_name)
    trainer = LocalTrainer(cfg, model, toy_classification(n=16), CPU)
    anchor = {k: torch.full_like(v, 0.5) for k, v in adapter_state(trainer.model).items()}
    assert any("classifier" in k for k in anchor) and any("lora_A" in k for k in anchor)
    trainer.train_round(1, proximal_mu=1 / lr, anchor=anchor)
    after = adapter_state(trainer.model)
    assert after.keys() == anchor.keys()
    for key, tensor in after.items():
        torch.testing.assert_close(tensor, anchor[key], msg=key)


def test_secure_mode_without_torchcsprng_is_one_line(make_config, vocab_size, toy_classification, tmp_path):
    if importlib.util.find_spec("torchcsprng") is not None:
        pytest.skip("torchcsprng is installed here: secure mode works")
    cfg = make_config({"privacy": {"secure_mode": True}})
    data = toy_classification(n=16)
    model = build_model(cfg.model, ("a", "b"), vocab_size).model
    with pytest.raises(ConfigError, match=r"^privacy\.secure_mode: true needs the torchcsprng") as err:
        LocalTrainer(cfg, model, data, CPU, preset_ledger(tmp_path / "ledger.json", cfg))
    assert "\n" not in str(err.value)
