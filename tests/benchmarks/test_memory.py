"""Issue 13: a long simulation's client processes hold their memory flat, round after round."""

from __future__ import annotations

import gc

import pytest

from benchmarks.memory import growth, in_process


@pytest.fixture
def no_automatic_collection():
    """In a Ray actor the heap holds ~600k long-lived objects, so Python's full collections are rare
    and a message's reference cycles wait many rounds; here they would never be freed. Whatever the
    ClientApp leaves to the collector then shows up as growth, at once and deterministically."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()
    gc.collect()


@pytest.mark.slow
def test_a_client_process_holds_its_memory_flat_from_round_2_to_20(
    make_config, tmp_path, no_automatic_collection
):
    """Two virtual clients at ranks 2 and 8 (the rank-2 one folds what its truncation drops into a
    private copy of base weights), 20 rounds, every train message through the simulation's ClientApp
    in this process, DP with the real Opacus and PEFT: live tensor bytes and RSS within 10% of round 2."""
    cfg = make_config(
        {
            "simulation": {"num_clients": 2, "client_ranks": [2, 8]},
            "federation": {"rounds": 20, "min_clients": 2, "aggregator": "exact"},
            "training": {"local_steps": 1, "batch_size": 8},
            "data": {"max_length": 32},
        }
    )

    figures = in_process(cfg, tmp_path / "run")

    assert sorted(figures) == list(range(1, 21))
    ratios = growth(figures)
    tensors = [figures[r]["live tensors"] for r in range(2, 21)]
    assert ratios["live tensors"] <= 1.10 and max(tensors) <= 1.10 * tensors[0], tensors
    assert ratios["process RSS"] <= 1.10, [figures[r]["process RSS"] for r in range(1, 21)]


def test_clients_of_any_rank_in_one_process_share_one_base(make_config, vocab_size):
    """Ranks 2, 8 and 16 in turn (as mixed-rank virtual clients reach one Ray actor): the base is
    loaded once and its frozen weights are the same tensors in every client's model, not one load per
    rank (a cache of two held three ranks by evicting and reloading the base for every message)."""
    from fedlora.common.model import _base_template, build_model, forget_base_models

    forget_base_models()
    labels = ("a", "b")
    built = {}
    for rank in (2, 8, 16, 2, 8, 16):
        cfg = make_config({"model": {"lora_r": rank, "lora_alpha": 2.0 * rank}})
        built[rank] = build_model(cfg.model, labels, vocab_size)

    assert _base_template.cache_info().misses == 1
    assert len({b.fingerprint for b in built.values()}) == 1
    frozen = [
        {name: p for name, p in b.model.named_parameters() if "base_layer.weight" in name}
        for b in built.values()
    ]
    assert frozen[0] and all(f.keys() == frozen[0].keys() for f in frozen)
    assert all(f[name] is frozen[0][name] for f in frozen for name in f)


def test_copies_share_the_frozen_base_even_after_its_template_was_evicted(make_config, vocab_size):
    """The cached adapter model keeps its own template: when the template cache has evicted it (other
    base models came through the process), copies still share those weights instead of cloning them."""
    from fedlora.common.model import _base_template, build_model, forget_base_models

    forget_base_models()
    cfg = make_config({})
    first = build_model(cfg.model, ("a", "b"), vocab_size).model
    _base_template.cache_clear()
    second = build_model(cfg.model, ("a", "b"), vocab_size).model
    frozen = dict(first.named_parameters())
    shared = [name for name, p in second.named_parameters() if "base_layer.weight" in name]
    assert shared and all(dict(second.named_parameters())[n] is frozen[n] for n in shared)
