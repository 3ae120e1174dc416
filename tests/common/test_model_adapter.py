"""Identical builds, fingerprints, PEFT export, the wire format and what an update must look like."""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest
import torch
from peft import PeftModel
from transformers import BertConfig, BertModel

from fedlora.client.ledger import PrivacyLedger
from fedlora.client.trainer import LocalTrainer
from fedlora.common.adapter import (
    METADATA_FILE,
    adapter_state,
    delta,
    export_adapter,
    fold_into_base,
    from_record,
    l2_norm,
    load_adapter_state,
    non_finite,
    peft_module,
    to_record,
)
from fedlora.common.config import DataConfig, ModelConfig
from fedlora.common.data import tokenize_causal_lm
from fedlora.common.errors import AdapterError, ModelError
from fedlora.common.lora_math import dropped_by_truncation, lora_pairs, truncate_state
from fedlora.common.model import build_base_model, build_model, load_tokenizer, lora_scale

CPU = torch.device("cpu")
BERT = ModelConfig(source="tiny-bert")
LLAMA = ModelConfig(source="tiny-llama", task="causal-lm")
LABELS = ("cardio", "derm", "resp")


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(("cfg", "labels"), [(BERT, LABELS), (LLAMA, ())], ids=["tiny-bert", "tiny-llama"])
def test_two_builds_are_identical(cfg, labels, vocab_size):
    torch.manual_seed(1)  # the global RNG state must not matter
    first = build_model(cfg, labels, vocab_size)
    torch.manual_seed(2)
    second = build_model(cfg, labels, vocab_size)
    state = adapter_state(first.model)
    assert_same_state(state, adapter_state(second.model))
    assert first.fingerprint == second.fingerprint
    # The frozen base is identical too (a different base would make equal adapters meaningless).
    base_a = {k: v for k, v in first.model.state_dict().items() if "lora_" not in k}
    base_b = {k: v for k, v in second.model.state_dict().items() if "lora_" not in k}
    assert_same_state(base_a, base_b)
    # The comparison is not vacuous: A is random, and B (zero at init) is there.
    assert any("lora_A" in k and float(v.abs().sum()) > 0 for k, v in state.items())
    assert any("lora_B" in k for k in state)
    # Only LoRA (and the classification head) is trainable.
    trainable = [n for n, p in first.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)


def test_fingerprint_names_base_labels_and_layout_not_rank(vocab_size, tmp_path):
    reference = build_model(BERT, LABELS, vocab_size).fingerprint

    def fp(cfg=BERT, labels=LABELS):
        return build_model(cfg, labels, vocab_size).fingerprint

    # Mixed ranks must stay compatible.
    assert fp(ModelConfig(source="tiny-bert", lora_r=4)) == reference
    assert fp(ModelConfig(source="tiny-bert", lora_r=16, lora_alpha=8.0)) == reference
    assert fp(ModelConfig(source="tiny-bert", lora_r=16, use_rslora=True)) == reference
    # Anything that changes what the adapter means is refused.
    assert fp(labels=("cardio", "derm", "neuro")) != reference
    assert fp(labels=("derm", "cardio", "resp")) != reference  # same set, other order
    assert fp(ModelConfig(source="tiny-bert", variant="ffa")) != reference
    assert fp(ModelConfig(source="tiny-bert", pooling="cls")) != reference
    assert fp(ModelConfig(source="tiny-bert", target_modules=("query",))) != reference
    assert fp(ModelConfig(source="tiny-bert", init_seed=1)) != reference
    assert fp(ModelConfig(source="tiny-bert", head_init="zero")) != reference
    assert fp(ModelConfig(source="tiny-bert", label_prompt="about {}")) != reference
    assert fp(ModelConfig(source="tiny-bert", normalize=False)) != reference
    # Another base model: a local Hugging Face folder with its own weights.
    torch.manual_seed(7)
    other = BertModel(
        BertConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        ),
        add_pooling_layer=False,
    )
    other.save_pretrained(tmp_path / "other-bert")
    assert fp(ModelConfig(source=str(tmp_path / "other-bert"))) != reference


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha-over-r", "rslora"])
def test_lora_scale_is_the_factor_peft_applies(vocab_size, rslora):
    """The scale the parties exchange must be the one PEFT multiplies B @ A by, or mixed-rank
    products would not compare."""
    cfg = ModelConfig(source="tiny-bert", lora_r=4, lora_alpha=12.0, use_rslora=rslora)
    model = build_model(cfg, LABELS, vocab_size).model
    applied = {m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A") and m.lora_A}
    assert applied == {lora_scale(cfg)}
    assert lora_scale(cfg) == (6.0 if rslora else 3.0)


def test_label_names_head_is_a_zero_shot_cosine_classifier(vocab_size):
    cfg = ModelConfig(source="tiny-bert", label_prompt="a note about {}", head_scale=7.0)
    base = build_base_model(cfg, LABELS, vocab_size).eval()
    tokenizer = load_tokenizer(cfg)
    names = tokenizer([f"a note about {label}" for label in LABELS], padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = base.embed(names["input_ids"], names["attention_mask"])
        logits = base(names["input_ids"], names["attention_mask"])
    assert torch.allclose(pooled.norm(dim=1), torch.ones(len(LABELS)), atol=1e-5)
    # Each label's own name scores head_scale x cos(name, name) = head_scale, the most of any label.
    assert torch.allclose(logits.diagonal(), torch.full((len(LABELS),), 7.0), atol=1e-4)
    assert torch.equal(logits.argmax(1), torch.arange(len(LABELS)))
    assert float(base.classifier.bias.abs().sum()) == 0.0
    zero = build_base_model(ModelConfig(source="tiny-bert", head_init="zero"), LABELS, vocab_size)
    assert float(zero.classifier.weight.abs().sum()) == 0.0


def test_builds_share_the_frozen_base_and_training_one_leaves_the_others_alone(
    make_config, vocab_size, toy_classification, tmp_path
):
    """Copies share the base weights (no clone per message); a DP round on one copy must not reach
    the shared template, another live copy, or the next build."""
    cfg = make_config(
        {"training": {"batch_size": 4, "learning_rate": 0.05}, "privacy": {"accountant": "rdp"}}
    )
    labels = ("a", "b")
    first, second = (build_model(cfg.model, labels, vocab_size).model for _ in range(2))
    frozen = {n: p for n, p in first.named_parameters() if not p.requires_grad and "classifier" not in n}
    other = dict(second.named_parameters())
    assert frozen and all(p.data_ptr() == other[n].data_ptr() for n, p in frozen.items())
    trainable = [n for n, p in first.named_parameters() if p.requires_grad]
    assert all(p.data_ptr() != other[n].data_ptr() for n, p in first.named_parameters() if n in trainable)

    data = toy_classification(n=16)
    before = logits_of(second, data.input_ids, data.attention_mask)
    base_before = {n: p.detach().clone() for n, p in frozen.items()}
    ledger = PrivacyLedger(tmp_path / "ledger.json", cfg.privacy.epsilon, cfg.privacy.delta, "rdp")
    ledger.noise_multiplier = 1.0
    trainer = LocalTrainer(cfg, first, data, CPU, ledger)
    trainer.train_round(1, steps=4)

    assert_same_state(base_before, {n: p.detach() for n, p in frozen.items()})
    torch.testing.assert_close(logits_of(second, data.input_ids, data.attention_mask), before)
    third = build_model(cfg.model, labels, vocab_size).model
    assert_same_state(adapter_state(third), adapter_state(second))
    # Not vacuous: the trained copy did move.
    trained = logits_of(peft_module(trainer.model), data.input_ids, data.attention_mask)
    assert (trained - before).abs().max() > 1e-3


def test_ffa_freezes_a(vocab_size):
    built = build_model(ModelConfig(source="tiny-bert", variant="ffa"), LABELS, vocab_size)
    names = {n: p.requires_grad for n, p in built.model.named_parameters() if "lora_" in n}
    assert names
    assert not any(v for n, v in names.items() if "lora_A" in n)
    assert all(v for n, v in names.items() if "lora_B" in n)


def test_peft_wraps_once_per_model_config_and_a_loaded_frozen_a_stays_in_its_copy(vocab_size):
    """build_model copies a per-process fresh adapter model (PEFT's wrapping is not paid per message):
    one wrap per model config, and nothing a copy loads, frozen FFA A factors included (only the base
    is shared), reaches the next build."""
    from fedlora.common.model import fresh_adapter

    fresh_adapter.cache_clear()
    cfg = ModelConfig(source="tiny-bert", variant="ffa")
    first = build_model(cfg, LABELS, vocab_size).model
    fresh = adapter_state(first)
    g = torch.Generator().manual_seed(0)
    load_adapter_state(first, {k: torch.randn(v.shape, generator=g) for k, v in fresh.items()})
    second = build_model(cfg, LABELS, vocab_size).model
    build_model(dataclasses.replace(cfg, lora_r=4, lora_alpha=8), LABELS, vocab_size)
    assert fresh_adapter.cache_info().misses == 2  # rank 8 once, rank 4 once
    assert_same_state(adapter_state(second), fresh)
    assert any(not torch.equal(adapter_state(first)[k], fresh[k]) for k in fresh if ".lora_A." in k)


def logits_of(model, ids, mask, causal=False):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if causal else out


def test_exported_tiny_bert_adapter_reloads_with_peft(make_config, vocab_size, toy_classification, tmp_path):
    cfg = make_config(
        {"training": {"batch_size": 4, "learning_rate": 0.05}, "privacy": {"accountant": "rdp"}}
    )
    labels = ("a", "b")
    data = toy_classification(n=16)
    ledger = PrivacyLedger(tmp_path / "ledger.json", cfg.privacy.epsilon, cfg.privacy.delta, "rdp")
    ledger.noise_multiplier = 1.0  # calibration is irrelevant here
    trainer = LocalTrainer(cfg, build_model(cfg.model, labels, vocab_size).model, data, CPU, ledger)
    trainer.train_round(1, steps=4)

    out = export_adapter(trainer.model, tmp_path / "adapter", {"fingerprint": "f00", "labels": list(labels)})
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / METADATA_FILE).read_text())["labels"] == list(labels)

    reloaded = PeftModel.from_pretrained(build_base_model(cfg.model, labels, vocab_size), out)
    ids, mask = data.input_ids, data.attention_mask
    trained = logits_of(peft_module(trainer.model), ids, mask)
    torch.testing.assert_close(logits_of(reloaded, ids, mask), trained, atol=1e-6, rtol=1e-5)
    # Not vacuous: training moved the logits away from the untrained model's (zero head).
    fresh = logits_of(build_model(cfg.model, labels, vocab_size).model, ids, mask)
    assert (trained - fresh).abs().max() > 1e-3


@pytest.mark.slow
def test_exported_tiny_llama_adapter_reloads_with_peft(make_config, vocab_size, tokenizer, tmp_path):
    cfg = make_config(
        {
            "model": {"source": "tiny-llama", "task": "causal-lm"},
            "training": {"batch_size": 4, "learning_rate": 0.05},
            "privacy": {"enabled": False},
        }
    )
    frame = pd.DataFrame({"prompt": [f"question {i}" for i in range(8)], "response": ["yes"] * 8})
    data = tokenize_causal_lm(frame, DataConfig(), tokenizer, "frame")
    trainer = LocalTrainer(cfg, build_model(cfg.model, (), vocab_size).model, data, CPU)
    trainer.train_round(1, steps=4)
    out = export_adapter(trainer.model, tmp_path / "adapter", {})
    reloaded = PeftModel.from_pretrained(build_base_model(cfg.model, (), vocab_size), out)
    ids, mask = data.input_ids, data.attention_mask
    trained = logits_of(peft_module(trainer.model), ids, mask, causal=True)
    torch.testing.assert_close(logits_of(reloaded, ids, mask, causal=True), trained, atol=1e-5, rtol=1e-5)
    fresh = logits_of(build_model(cfg.model, (), vocab_size).model, ids, mask, causal=True)
    assert (trained - fresh).abs().max() > 1e-4


@pytest.fixture(scope="module")
def state(vocab_size):
    built = build_model(BERT, LABELS, vocab_size)
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in adapter_state(built.model).items()}


def test_record_round_trip(state):
    exact = from_record(to_record(state, "fp32"))
    assert_same_state(exact, state)
    half = from_record(to_record(state, "fp16"))
    assert half.keys() == state.keys()
    for key in state:
        assert half[key].dtype == torch.float32
        torch.testing.assert_close(half[key], state[key], rtol=1e-3, atol=1e-4)
    assert any(not torch.equal(half[k], state[k]) for k in state)  # fp16 did round
    # bf16 can't travel as is: it goes as fp32, exactly.
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    assert_same_state(from_record(to_record(bf16)), {k: v.float() for k, v in bf16.items()})


def test_delta_is_the_change_and_its_norm(state):
    old = {k: v * 0.5 for k, v in state.items()}
    update = delta(state, old)
    for key in state:
        torch.testing.assert_close(old[key] + update[key], state[key])
    assert l2_norm(update) == pytest.approx(
        math.sqrt(sum(float((v * 0.5).double().pow(2).sum()) for v in state.values())), rel=1e-9
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_names_every_bad_tensor_in_order(state, value):
    assert non_finite(state) == []
    bad = {k: v.clone() for k, v in state.items()}
    keys = sorted(state)[1::2]
    for key in keys:
        bad[key].view(-1)[0] = value
    assert non_finite(bad) == keys


def test_load_adapter_state_checks_keys_and_shapes(vocab_size, state):
    model = build_model(BERT, LABELS, vocab_size).model
    load_adapter_state(model, state)
    assert_same_state(adapter_state(model), state)
    key = sorted(state)[0]
    partial = {key: torch.ones_like(state[key])}
    load_adapter_state(model, partial)
    after = adapter_state(model)
    assert torch.equal(after[key], partial[key])
    assert all(torch.equal(after[k], state[k]) for k in state if k != key)
    with pytest.raises(AdapterError, match="nonexistent"):
        load_adapter_state(model, {"nonexistent.weight": torch.zeros(1)})
    with pytest.raises(AdapterError) as info:
        load_adapter_state(model, {key: torch.zeros(3, 3, 3)})
    assert key in str(info.value)
    # A refused load writes nothing, not even its good tensors.
    other = sorted(state)[1]
    with pytest.raises(AdapterError):
        load_adapter_state(model, {other: torch.zeros_like(state[other]), key: torch.zeros(3, 3, 3)})
    assert torch.equal(adapter_state(model)[other], state[other])
    # The values are the parameters the model computes with.
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert any(torch.equal(p, partial[key]) for p in trained.values())


def test_a_lower_rank_client_with_the_dropped_product_folded_computes_the_global_model(
    vocab_size, toy_classification
):
    """Rank 2 under a rank-8 global adapter: its truncation alone is another model; with what the
    truncation drops folded into its base it is the global model, training only rank-2 factors,
    and the base tensors it shares with other copies stay as they were."""
    data = toy_classification(n=8, num_labels=len(LABELS))
    high = build_model(BERT, LABELS, vocab_size).model
    g = torch.Generator().manual_seed(3)
    global_state = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in adapter_state(high).items()}
    load_adapter_state(high, global_state)
    low_cfg = dataclasses.replace(BERT, lora_r=2)
    scale_high, scale_low = BERT.lora_alpha / BERT.lora_r, low_cfg.lora_alpha / 2
    truncated = truncate_state(global_state, 2, scale_high, scale_low)
    plain, folded = (build_model(low_cfg, LABELS, vocab_size).model for _ in range(2))
    shared = {n: p.detach().clone() for n, p in plain.named_parameters() if not p.requires_grad}
    for model in (plain, folded):
        load_adapter_state(model, truncated)
    fold_into_base(folded, dropped_by_truncation(global_state, truncated, scale_high, scale_low))

    ids, mask = data.input_ids, data.attention_mask
    want = logits_of(high, ids, mask)
    torch.testing.assert_close(logits_of(folded, ids, mask), want, atol=1e-5, rtol=0)
    assert (logits_of(plain, ids, mask) - want).abs().max() > 1e-3
    trainable = {n: tuple(p.shape) for n, p in folded.named_parameters() if p.requires_grad}
    assert trainable == {n: tuple(p.shape) for n, p in plain.named_parameters() if p.requires_grad}
    assert all(shape[0] == 2 for n, shape in trainable.items() if ".lora_A." in n)
    assert_same_state(shared, {n: p.detach() for n, p in plain.named_parameters() if n in shared})


def test_fold_into_base_names_a_layer_it_cannot_change(vocab_size):
    model = build_model(BERT, LABELS, vocab_size).model
    prefix = next(iter(lora_pairs(adapter_state(model))))
    with pytest.raises(AdapterError, match="no layer 'nowhere'"):
        fold_into_base(model, {"nowhere": torch.zeros(2, 2)})
    with pytest.raises(AdapterError, match=r"\(3, 3\)"):
        fold_into_base(model, {prefix: torch.zeros(3, 3)})


@pytest.mark.parametrize("make", [lambda p: p / "nope", lambda p: p], ids=["missing", "no-config-json"])
def test_missing_local_model_folder_names_the_path(tmp_path, vocab_size, make):
    path = make(tmp_path)
    cfg = ModelConfig(source=str(path))
    with pytest.raises(ModelError) as info:
        build_base_model(cfg, ("a", "b"), vocab_size)
    assert str(path) in str(info.value)
    with pytest.raises(ModelError) as info:
        load_tokenizer(cfg)
    assert str(path) in str(info.value)


CODE_NAMING = {
    "tokenizer-auto-map": ("tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["hub--tok.Slow", None]}}),
    "custom-pipelines": ("config.json", {"custom_pipelines": {"x": {"impl": "pipe.Pipe"}}}),
}


@pytest.mark.parametrize("case", sorted(CODE_NAMING))
def test_a_model_folder_naming_its_own_code_is_refused_before_transformers_reads_it(tmp_path, case):
    tiny = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    tiny.save_pretrained(tmp_path)
    name, extra = CODE_NAMING[case]
    path = tmp_path / name
    path.write_text(json.dumps({**(json.loads(path.read_text()) if path.exists() else {}), **extra}))
    cfg = ModelConfig(source=str(tmp_path))
    for load in (lambda: load_tokenizer(cfg), lambda: build_base_model(cfg, ("a", "b"), 30522)):
        with pytest.raises(ModelError, match=f"{tmp_path} asks to run its own code \\({name}") as info:
            load()
        assert "\n" not in str(info.value)
    assert ("tok.py" if "tokenizer" in case else "pipe.py") in str(info.value)


def test_tiny_models_refuse_the_other_task(vocab_size):
    with pytest.raises(ModelError, match="tiny-llama"):
        build_base_model(ModelConfig(source="tiny-llama"), ("a", "b"), vocab_size)
    with pytest.raises(ModelError, match="tiny-bert"):
        build_base_model(ModelConfig(source="tiny-bert", task="causal-lm"), (), vocab_size)
    with pytest.raises(ModelError, match="at least 2 labels"):
        build_base_model(BERT, ("a",), vocab_size)


@pytest.mark.parametrize(
    ("source", "task", "targets", "found", "existing"),
    [
        ("tiny-bert", "classification", ("q_proj", "v_proj"), "no module of the base model", "query"),
        ("tiny-llama", "causal-lm", ("query",), "no module of the base model", "q_proj"),
        # The classification head is trained whole (modules_to_save): PEFT never puts LoRA on it.
        ("tiny-bert", "classification", ("classifier",), "no module of the base model", "value"),
        # A block, not a layer: PEFT would raise with the block's whole repr.
        ("tiny-bert", "classification", ("encoder",), "encoder, a BertModel", "dense"),
    ],
)
def test_target_modules_matching_no_layer_is_one_line(vocab_size, source, task, targets, found, existing):
    cfg = ModelConfig(source=source, task=task, target_modules=targets)
    with pytest.raises(ModelError) as info:
        build_model(cfg, ("a", "b") if task == "classification" else (), vocab_size)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"model.target_modules: {list(targets)} must name layers LoRA adapts, they match {found}"
    )
    assert existing in message.partition("linear layers include: ")[2]
    assert "classifier" not in message.partition("linear layers include: ")[2]


def test_target_modules_matching_by_suffix_is_kept(vocab_size):
    cfg = ModelConfig(source="tiny-bert", target_modules=("attention.self.query",))
    built = build_model(cfg, ("a", "b"), vocab_size)
    assert any(".query.lora_A." in name for name, _ in built.model.named_parameters())
