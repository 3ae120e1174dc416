"""common.model_pool: a model lent for one message comes back exactly as a fresh copy, or not at all.

Real PEFT models trained by real Opacus DP-SGD (the trainer the ClientApp uses); the reference is
a copy from ``build_model``, which the pool never touches.
"""

from __future__ import annotations

import threading

import pytest
import torch

from fedlora.client.ledger import PrivacyLedger
from fedlora.client.trainer import LocalTrainer
from fedlora.common.adapter import fold_into_base, peft_module
from fedlora.common.model import build_model, fresh_adapter, frozen_base
from fedlora.common.model_pool import borrowed_model
from helpers.dp import CAUSAL, varied_answers

CPU = torch.device("cpu")
LABELS = ("a", "b", "c")
# What Opacus and torch leave behind on a model after its hooks are removed (the reset drops them).
LEFTOVERS = ("summed_grad", "activations")


def train_dp_round(cfg, model, data, tmp_path) -> None:
    """One DP round as the ClientApp runs it: Opacus wraps, trains, and is closed again."""
    ledger = PrivacyLedger.from_config(cfg.privacy, tmp_path / "ledger.json")
    ledger.noise_multiplier = 1.0
    trainer = LocalTrainer(cfg, model, data, CPU, ledger)
    try:
        trainer.train_round(1)
    finally:
        trainer.close()


def plain_attributes(thing: object) -> dict:
    return {k: v for k, v in vars(thing).items() if isinstance(v, bool | int | float | str | type(None))}


def assert_like_fresh(model, fresh) -> None:
    """Every tensor's values, every module's and tensor's attributes, no gradients, no hooks."""
    mine, theirs = dict(model.named_modules()), dict(fresh.named_modules())
    assert mine.keys() == theirs.keys()
    for name, module in mine.items():
        assert vars(module).keys() == vars(theirs[name]).keys(), name
        assert plain_attributes(module) == plain_attributes(theirs[name]), name
        assert len(module._forward_hooks) == len(theirs[name]._forward_hooks), name
        assert len(module._backward_hooks) == len(theirs[name]._backward_hooks), name
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    fresh_tensors = dict([*fresh.named_parameters(), *fresh.named_buffers()])
    assert tensors.keys() == fresh_tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(tensor, fresh_tensors[name]), name
        assert tensor.grad is None, name
        assert vars(tensor).keys() == vars(fresh_tensors[name]).keys(), name


def test_a_model_trained_with_dp_comes_back_equal_to_a_fresh_copy(
    make_config, vocab_size, toy_classification, tmp_path
):
    cfg = make_config({"training": {"batch_size": 8, "local_steps": 3}, "privacy": {"accountant": "rdp"}})
    reference = build_model(cfg.model, LABELS, vocab_size).model
    with borrowed_model(cfg.model, LABELS, vocab_size) as built:
        lent = built.model
        train_dp_round(cfg, lent, toy_classification(32, 3), tmp_path)
        # What the reset must undo: trained values, and Opacus' clipped sum left on each parameter.
        pairs = zip(lent.parameters(), reference.parameters(), strict=True)
        assert not all(torch.equal(a, b) for a, b in pairs)
        assert all(hasattr(p, "summed_grad") for p in lent.parameters() if p.requires_grad)
        assert any(hasattr(m, "activations") for m in lent.modules())

    with borrowed_model(cfg.model, LABELS, vocab_size) as again:
        assert again.model is lent
        assert_like_fresh(again.model, reference)
        assert not any(hasattr(p, name) for p in again.model.parameters() for name in LEFTOVERS)


def test_a_model_whose_base_was_folded_is_not_lent_again(make_config, vocab_size):
    cfg = make_config()
    with borrowed_model(cfg.model, LABELS, vocab_size) as built:
        folded = built.model
        layer = next(name for name, _ in peft_module(folded).named_modules() if name.endswith("query"))
        weight = peft_module(folded).get_submodule(layer).get_base_layer().weight
        fold_into_base(folded, {layer: torch.ones_like(weight)})
    with borrowed_model(cfg.model, LABELS, vocab_size) as again:
        assert again.model is not folded
        _, template, _ = fresh_adapter(cfg.model, LABELS, vocab_size)
        shared = frozen_base(template)
        base = peft_module(again.model).get_submodule(layer).get_base_layer().weight
        assert id(base) in shared


def test_a_model_is_not_kept_after_an_error(make_config, vocab_size):
    cfg = make_config()
    with pytest.raises(RuntimeError), borrowed_model(cfg.model, LABELS, vocab_size) as built:
        failed = built.model
        raise RuntimeError("the message failed half-way")
    with borrowed_model(cfg.model, LABELS, vocab_size) as again:
        assert again.model is not failed


def test_borrowers_at_the_same_time_get_models_of_their_own(make_config, vocab_size):
    cfg = make_config()
    models, ready = [], threading.Barrier(2)

    def borrow() -> None:
        with borrowed_model(cfg.model, LABELS, vocab_size) as built:
            models.append(built.model)
            ready.wait(timeout=30)

    threads = [threading.Thread(target=borrow) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(models) == 2 and models[0] is not models[1]


def test_a_model_trained_with_gradient_checkpointing_is_not_lent_again(
    make_config, vocab_size, tokenizer, tmp_path
):
    """Checkpointing sets flags on the base's layers and hooks its embeddings (their output must
    require grad): a model with a hook the fresh one lacks is dropped, and the next message, without
    checkpointing, computes exactly what a fresh copy does."""
    cfg = make_config(
        {**CAUSAL, "training": {"batch_size": 4, "local_steps": 2, "gradient_checkpointing": True}}
    )
    data = varied_answers(tokenizer)
    with borrowed_model(cfg.model, (), vocab_size) as built:
        lent = built.model
        train_dp_round(cfg, lent, data, tmp_path)
        assert any(getattr(m, "gradient_checkpointing", False) for m in lent.modules())
    reference = build_model(cfg.model, (), vocab_size).model
    with borrowed_model(cfg.model, (), vocab_size) as again:
        assert again.model is not lent
        assert_like_fresh(again.model, reference)
        batch = (data.input_ids[:2], data.attention_mask[:2])
        again.model.eval(), reference.eval()
        with torch.no_grad():
            mine = again.model(input_ids=batch[0], attention_mask=batch[1]).logits
            theirs = reference(input_ids=batch[0], attention_mask=batch[1]).logits
        assert torch.equal(mine, theirs)
