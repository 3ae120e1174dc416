"""The frozen base in low precision (model.dtype) or quantized (model.quantization); LoRA in fp32."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import PeftModel

from fedlora.client.trainer import LocalTrainer
from fedlora.common.adapter import adapter_state, export_adapter, peft_module
from fedlora.common.config import to_dict
from fedlora.common.errors import ModelError
from fedlora.common.model import build_base_model, build_model
from helpers.dp import CPU, preset_ledger, varied_answers

CAUSAL = {"model": {"source": "tiny-llama", "task": "causal-lm"}}


def split_dtypes(model):
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    return trained, frozen


def test_bf16_base_with_fp32_lora_trains_under_dp_and_exports_a_peft_adapter(
    make_config, vocab_size, tokenizer, tmp_path
):
    cfg = make_config(
        {
            "model": {**CAUSAL["model"], "dtype": "bf16"},
            "training": {"batch_size": 4, "local_steps": 3, "learning_rate": 0.01},
            "privacy": {"accountant": "rdp", "max_grad_norm": 1.0, "epsilon": 50.0, "delta": 1e-3},
        }
    )
    built = build_model(cfg.model, (), vocab_size)
    assert split_dtypes(built.model) == ({torch.float32}, {torch.bfloat16})
    data = varied_answers(tokenizer, n=16)
    trainer = LocalTrainer(cfg, built.model, data, CPU, preset_ledger(tmp_path / "ledger.json", cfg, 1.0))
    before = adapter_state(trainer.model)
    result = trainer.train_round(1)
    after = adapter_state(trainer.model)
    assert result.epsilon > 0 and torch.isfinite(torch.tensor(result.loss))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after), "DP steps moved the adapter"

    out = export_adapter(
        trainer.model, tmp_path / "adapter", {"config": to_dict(cfg), "fingerprint": built.fingerprint}
    )
    fresh = build_base_model(cfg.model, (), vocab_size)
    loaded = PeftModel.from_pretrained(fresh, out, is_trainable=False)
    lora = {p.dtype for n, p in loaded.named_parameters() if "lora_" in n}
    base = {p.dtype for n, p in loaded.named_parameters() if "lora_" not in n}
    assert (lora, base) == ({torch.float32}, {torch.bfloat16})
    ids = data.input_ids[:2]
    mask = data.attention_mask[:2]
    module = peft_module(trainer.model)
    module.eval()
    loaded.eval()
    with torch.no_grad():
        want = module(input_ids=ids, attention_mask=mask).logits
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_fingerprint_covers_the_base_precision(make_config, vocab_size):
    prints = {
        dtype: build_model(
            make_config({"model": {**CAUSAL["model"], "dtype": dtype}}).model, (), vocab_size
        ).fingerprint
        for dtype in ("auto", "fp32", "bf16", "fp16")
    }
    # 'auto' of a model built from a config is fp32: the same base, the same fingerprint.
    assert prints["auto"] == prints["fp32"]
    assert len({prints["fp32"], prints["bf16"], prints["fp16"]}) == 3


def test_bf16_encoder_keeps_an_fp32_head(make_config, vocab_size, toy_classification):
    cfg = make_config({"model": {"dtype": "bf16"}})
    model = build_model(cfg.model, ("a", "b"), vocab_size).model
    data = toy_classification(n=4)
    head = {n: p.dtype for n, p in model.named_parameters() if "classifier" in n}
    assert head and set(head.values()) == {torch.float32}
    logits = model(input_ids=data.input_ids, attention_mask=data.attention_mask)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("kind", ["8bit", "4bit-nf4"])
def test_quantization_refuses_in_one_line_where_it_cannot_run(make_config, vocab_size, tmp_path, kind):
    folder = tmp_path / "llama"
    build_base_model(make_config(CAUSAL).model, (), vocab_size).save_pretrained(folder)
    cfg = make_config({"model": {"source": str(folder), "task": "causal-lm", "quantization": kind}})
    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("CUDA and bitsandbytes are here: quantization runs (benchmarks llm_throughput)")
    with pytest.raises(ModelError) as info:
        build_model(cfg.model, (), vocab_size)
    message = str(info.value)
    assert message.startswith(f"model.quantization: '{kind}' needs") and "\n" not in message
    needed = "CUDA" if not torch.cuda.is_available() else "bitsandbytes"
    assert needed in message


def test_quantization_of_a_model_built_from_a_config_is_refused(make_config, vocab_size):
    cfg = make_config({"model": {**CAUSAL["model"], "quantization": "4bit-nf4"}})
    with pytest.raises(ModelError, match=r"^model\.quantization: '4bit-nf4' quantizes a pretrained base"):
        build_model(cfg.model, (), vocab_size)


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="4-bit quantization needs CUDA and bitsandbytes",
)
def test_4bit_base_trains_fp32_lora_under_dp_on_cuda(make_config, vocab_size, tokenizer, tmp_path):
    folder = tmp_path / "llama"
    build_base_model(make_config(CAUSAL).model, (), vocab_size).save_pretrained(folder)
    model_cfg = {"source": str(folder), "task": "causal-lm", "quantization": "4bit-nf4", "dtype": "bf16"}
    cfg = make_config(
        {
            "model": model_cfg,
            "training": {"batch_size": 4, "local_steps": 2, "learning_rate": 0.01, "device": "cuda"},
            "privacy": {"accountant": "rdp", "max_grad_norm": 1.0, "epsilon": 50.0, "delta": 1e-3},
        }
    )
    built = build_model(cfg.model, (), vocab_size)
    assert split_dtypes(built.model)[0] == {torch.float32}
    data = varied_answers(tokenizer, n=16)
    cuda = torch.device("cuda")
    trainer = LocalTrainer(cfg, built.model, data, cuda, preset_ledger(tmp_path / "ledger.json", cfg, 1.0))
    trainer.train_round(1)
    assert all(torch.isfinite(t).all() for t in adapter_state(trainer.model).values())
