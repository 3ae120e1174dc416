"""The causal-LM throughput benchmark: both modes measured in their own processes, in one table;
what cannot run here (quantization without CUDA) refused in one line before anything starts."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks.__main__ import BENCHMARKS
from benchmarks.llm_throughput import main


def test_registered():
    assert "llm_throughput" in BENCHMARKS


def test_dp_and_non_private_rows_with_tokens_and_memory(capsys):
    argv = ["--model", "tiny-llama", "--seq-len", "16", "--batch-size", "4", "--steps", "2", "--repeats", "1"]
    assert main([*argv, "--device", "cpu", "--physical-batch-size", "2", "--gradient-checkpointing"]) == 0
    out = capsys.readouterr()
    rows = {line.split("│")[1].strip(): line for line in out.out.splitlines() if "│" in line and "-" in line}
    assert {"non-private", "dp-hooks"} <= set(rows), out.out
    assert "1.00x" in rows["non-private"]
    for mode in ("non-private", "dp-hooks"):
        assert f"{mode}" in out.err and "tokens/s" in out.err and "GiB" in out.err


def test_quantization_without_cuda_is_one_line(capsys):
    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("CUDA and bitsandbytes are here: the 4-bit run is real")
    assert main(["--model", "llama-7b", "--quantization", "4bit-nf4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.quantization: '4bit-nf4' needs") and "\n" not in err
