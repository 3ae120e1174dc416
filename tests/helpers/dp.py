"""DP-SGD test helpers shared by the trainer, memory, precision, pool and privacy-unit tests: tiny
models with non-zero LoRA factors, a brute-force per-example gradient loop to check Opacus against, a
ledger with its noise already fixed, small causal-LM data sets, and the test-only seeds of a local
privacy audit."""

from __future__ import annotations

import math
from dataclasses import replace

import pandas as pd
import pytest
import torch

from fedlora.client import privacy_audit
from fedlora.client.canaries import new_spec
from fedlora.client.ledger import PrivacyLedger
from fedlora.common.adapter import peft_module
from fedlora.common.config import DataConfig
from fedlora.common.data import tokenize_causal_lm
from fedlora.common.model import build_model
from fedlora.common.scoring import forward_loss, trim

CPU = torch.device("cpu")


LABELS = ("a", "b", "c")


def perturbed_model(cfg, vocab_size, labels=LABELS, seed=0, scale=0.3):
    """A built LoRA model whose B matrices and head are non-zero, so every trainable tensor (LoRA A
    included: its gradient is zero while B is zero) gets a gradient."""
    built = build_model(cfg.model, labels, vocab_size)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in built.model.parameters():
            if param.requires_grad:
                param.normal_(0.0, scale, generator=g)
    return built.model


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def names_by_id(trainer):
    return {id(p): name for name, p in peft_module(trainer.model).named_parameters()}


def per_example_grads(model, batch, task="classification"):
    """Brute force on a plain (never wrapped) copy: each example alone, trimmed to its own length."""
    params = trainable(model)
    grads = []
    for i in range(len(batch[0])):
        single = trim(tuple(t[i : i + 1] for t in batch))
        loss, _ = forward_loss(model, task, single)
        grads.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True)))
    return grads


def assert_clipped_sum(trainer, expected: dict, rtol: float) -> None:
    """After a noise-free step: each trained tensor's clipped sum is ``expected`` (by adapter key), and
    so is the gradient the inner optimizer applied, times the expected batch size."""
    optimizer, names = trainer.optimizer, names_by_id(trainer)
    assert {names[id(p)] for p in optimizer.params} == set(expected)
    for p in optimizer.params:
        want = expected[names[id(p)]]
        torch.testing.assert_close(p.summed_grad, want, atol=1e-5, rtol=rtol)
        torch.testing.assert_close(p.grad * optimizer.expected_batch_size, want, atol=1e-5, rtol=rtol)


def norm_of(grads: dict) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


def preset_ledger(path, cfg, sigma=1.0):
    """A ledger whose noise is already fixed, as when read from an earlier round: calibration (a
    search over many compositions, ~10 s on a busy 2-core machine) is irrelevant to these tests."""
    ledger = PrivacyLedger.from_config(cfg.privacy, path)
    ledger.noise_multiplier = sigma
    return ledger


def causal_dataset(tokenizer, n=16):
    frame = pd.DataFrame(
        {
            "prompt": [f"question {i} about item {7 * i}" for i in range(n)],
            "response": ["the answer is always yes"] * n,
        }
    )
    return tokenize_causal_lm(frame, DataConfig(max_length=32), tokenizer, "frame")


CAUSAL = {"model": {"source": "tiny-llama", "task": "causal-lm"}}


def varied_answers(tokenizer, n=8):
    frame = pd.DataFrame(
        {
            "prompt": [f"question {i} about item {7 * i}" for i in range(n)],
            "response": [" ".join(["yes"] * (1 + (3 * i) % 7)) for i in range(n)],
        }
    )
    return tokenize_causal_lm(frame, DataConfig(max_length=32), tokenizer, "frame")


def seeded_audit(monkeypatch: pytest.MonkeyPatch, seed: int = 0) -> None:
    """Seeds for the local privacy audits a test runs next (client.privacy_audit), so that its
    statistical verdicts are one answer in every run: torch's RNG (Opacus' noise and Poisson
    sampling with privacy.secure_mode off, dropout) and the canaries' secret seed. Unseeded, a correct
    implementation fails the noise check at its false-alarm rate (1 in 1,000; it happened in CI) and
    the white-box bound holds at 95% confidence only. Tests only: production draws both unseeded."""
    torch.manual_seed(seed)
    monkeypatch.setattr(privacy_audit, "new_spec", lambda *args: replace(new_spec(*args), seed=seed))
