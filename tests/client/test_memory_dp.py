"""DP-SGD stays exact with the memory savers: gradient checkpointing and physical slices of a batch.

Brute force as in test_trainer_dp: Opacus' clipped, summed gradient must equal a per-example loop on
a plain copy, here on a tiny Llama whose trainer checkpoints its layers and cuts each batch into
slices smaller than the batch.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fedlora.client.trainer import LocalTrainer
from fedlora.common.adapter import peft_module
from helpers.dp import (
    CAUSAL,
    CPU,
    assert_clipped_sum,
    norm_of,
    per_example_grads,
    perturbed_model,
    preset_ledger,
    varied_answers,
)


class ForwardCounter:
    """Counts the forward calls of one decoder layer's MLP: twice per slice when checkpointed."""

    def __init__(self, model):
        layer = peft_module(model).get_base_model().model.layers[0].mlp
        self.calls = 0
        layer.register_forward_hook(self.hook)

    def hook(self, *_):
        self.calls += 1


class Grads:
    """The trainer's gradient hook: a copy of each trained tensor's gradient before the step."""

    def __init__(self):
        self.seen = {}

    def before_step(self, params):
        self.seen = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}

    def after_step(self, params):
        pass


@pytest.mark.parametrize("checkpointing", [True, False])
def test_clipped_sum_with_checkpointing_and_slices_equals_brute_force(
    make_config, vocab_size, tokenizer, tmp_path, checkpointing
):
    overrides = {
        **CAUSAL,
        "training": {
            "batch_size": 4,
            "local_steps": 5,
            "gradient_checkpointing": checkpointing,
            "physical_batch_size": 2,
        },
    }
    model = perturbed_model(make_config(CAUSAL), vocab_size, labels=(), scale=0.05)
    reference = copy.deepcopy(model)
    data = varied_answers(tokenizer)
    batch = tuple(t[:5] for t in (data.input_ids, data.attention_mask, data.labels))  # slices 2, 2, 1

    per = per_example_grads(reference, batch, task="causal-lm")
    norms = [norm_of(g) for g in per]
    clip = math.sqrt(min(norms) * max(norms))
    assert sum(n > clip for n in norms) >= 2 and sum(n < clip for n in norms) >= 2, (norms, clip)
    expected = {k: sum(g[k] * min(1.0, clip / n) for g, n in zip(per, norms, strict=True)) for k in per[0]}

    cfg = make_config(_merged(overrides, {"privacy": {"accountant": "rdp", "max_grad_norm": clip}}))
    trainer = LocalTrainer(cfg, model, data, CPU, preset_ledger(tmp_path / "ledger.json", cfg))
    counter = ForwardCounter(trainer.model)
    optimizer = trainer.optimizer
    optimizer.noise_multiplier = 0.0
    assert trainer._step(batch) is not None

    # Three slices, each layer run twice per slice when checkpointed (forward, then recomputed).
    assert counter.calls == 3 * (2 if checkpointing else 1)
    assert_clipped_sum(trainer, expected, rtol=1e-4)
    # One real step of the inner optimizer for the whole batch, not one per slice.
    assert all(int(optimizer.original_optimizer.state[p]["step"]) == 1 for p in optimizer.params)
    # Every captured activation was consumed: none is left to leak into the next step.
    leftovers = [m for m in trainer.model.modules() if getattr(m, "activations", None)]
    assert not leftovers


def test_slices_without_dp_give_the_whole_batch_gradient(make_config, vocab_size, tokenizer):
    data = varied_answers(tokenizer)
    batch = tuple(t[:5] for t in (data.input_ids, data.attention_mask, data.labels))
    model = perturbed_model(make_config(CAUSAL), vocab_size, labels=(), scale=0.05)
    grads = {}
    for name, physical in (("whole", None), ("slices", 2)):
        cfg = make_config(
            _merged(
                CAUSAL,
                {
                    "training": {
                        "batch_size": 5,
                        "local_steps": 1,
                        "physical_batch_size": physical,
                        "gradient_checkpointing": physical is not None,
                    },
                    "privacy": {"enabled": False},
                },
            )
        )
        trainer = LocalTrainer(cfg, copy.deepcopy(model), data, CPU)
        trainer.gradient_hook = hook = Grads()
        loss = trainer._step(batch)
        grads[name] = (loss, hook.seen)
    assert grads["whole"][1].keys() == grads["slices"][1].keys() and grads["whole"][1]
    assert grads["slices"][0] == pytest.approx(grads["whole"][0], rel=1e-5)
    for key, want in grads["whole"][1].items():
        torch.testing.assert_close(grads["slices"][1][key], want, atol=1e-6, rtol=1e-4)


def _merged(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = {**out.get(key, {}), **value}
    return out
