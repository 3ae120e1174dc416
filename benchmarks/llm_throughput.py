"""DP vs non-DP local training of a causal LM: tokens/s and peak memory, side by side.

Run: ``python -m benchmarks llm_throughput [--model smollm2] [--dtype bf16]
[--seq-len 128] [--batch-size 8] [--steps 4] [--repeats 2] [--gradient-checkpointing]
[--physical-batch-size N] [--quantization none|8bit|4bit-nf4] [--lora-r 8] [--device auto]``

`LocalTrainer` trains LoRA on synthetic sequences of exactly ``--seq-len`` tokens (the loss on every
token), non-private and with DP-SGD (Opacus hooks). Each (mode, repetition) runs in a fresh
process, so each one's peak memory is its own: the growth of peak RSS (CPU) or the peak of
allocated CUDA memory, from the loaded model to the end of its timed steps. Repetitions alternate
the order of the modes, so bursts of load on a shared machine hit both; the ratio (DP / non-private
tokens/s) is the median of the per-repetition ratios.

``--model`` takes any model.source (default SmolLM2-135M-Instruct, offline) or ``llama-7b``: a
Llama-2-7B-shaped model built from a config with random weights (nothing downloaded), for a GPU;
with ``--quantization`` it is first written to a temporary folder, because bitsandbytes quantizes
as a model loads. Quantization needs CUDA and bitsandbytes and is refused in one line elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks import PROG
from fedlora.client.ledger import PrivacyLedger
from fedlora.client.trainer import LocalTrainer
from fedlora.common.cli_support import console, report, run_cli
from fedlora.common.config import FedloraConfig, config_from_dict
from fedlora.common.data import TokenizedDataset
from fedlora.common.model import (
    DTYPES,
    build_model,
    device_for,
    load_tokenizer,
    lora_config,
    quantization_config,
    target_modules,
)

MODES = ("non-private", "dp-hooks")
ROWS = 256
LLAMA_7B = LlamaConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
)
"""Llama-2-7B's shape (6.7B parameters), built with random weights."""


def bench_config(args: argparse.Namespace, mode: str, source: str) -> FedloraConfig:
    return config_from_dict(
        {
            "model": {
                "source": source,
                "task": "causal-lm",
                "dtype": args.dtype,
                "quantization": args.quantization,
                "lora_r": args.lora_r,
                "lora_alpha": 2 * args.lora_r,
            },
            "data": {"max_length": args.seq_len},
            "training": {
                "recipe": "manual",
                "batch_size": args.batch_size,
                "local_steps": args.steps,
                "learning_rate": 1e-4,
                "device": args.device,
                "gradient_checkpointing": args.gradient_checkpointing,
                "physical_batch_size": args.physical_batch_size,
            },
            "privacy": {
                "enabled": mode != "non-private",
                "epsilon": 8.0,
                "delta": 0.1 / ROWS,
                "accountant": "rdp",
                "max_grad_norm": 1.0,
                "planned_rounds": 2,
            },
        },
        source=f"{PROG} llm_throughput",
    )


def synthetic(vocab: int, seq_len: int) -> TokenizedDataset:
    """ROWS sequences of exactly seq_len random tokens, the loss on all of them."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (ROWS, seq_len), generator=g)
    return TokenizedDataset(ids, torch.ones_like(ids), ids.clone())


def random_llama_folder(folder: Path) -> str:
    """LLAMA_7B with random weights saved as a model folder (bf16), for quantization at load; written
    once per benchmark run, in its temporary folder."""
    if (folder / "config.json").exists():
        return str(folder)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(LLAMA_7B).to(torch.bfloat16).save_pretrained(folder)
    return str(folder)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one_mode(args: argparse.Namespace, mode: str, ledger_path: str) -> dict[str, float]:
    """In a fresh process: build, then one untimed warm-up step and ``--steps`` timed ones; memory
    from the built model to the end."""
    torch.set_num_threads(args.threads)
    device = device_for(args.device)
    cfg = bench_config(args, mode, "tiny-llama" if args.model == "llama-7b" else args.model)
    if args.model == "llama-7b":
        model, vocab = build_llama_7b(cfg, device, Path(ledger_path).parent), LLAMA_7B.vocab_size
    else:
        model, vocab = build_model(cfg.model, (), args.vocab).model, args.vocab
    ledger = PrivacyLedger.from_config(cfg.privacy, ledger_path) if cfg.privacy.enabled else None
    trainer = LocalTrainer(cfg, model, synthetic(vocab, args.seq_len), device, ledger)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loaded = peak_bytes(device)
    trainer.train_round(1, steps=1)
    result = trainer.train_round(2, steps=args.steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = peak_bytes(device)
    return {
        "tokens_per_s": result.examples_seen * args.seq_len / result.seconds,
        "peak_gib": peak / 2**30,
        "growth_gib": (peak - loaded) / 2**30,
    }


def build_llama_7b(cfg: FedloraConfig, device: torch.device, scratch: Path) -> torch.nn.Module:
    """The 7B Llama with LoRA: quantized through a saved folder, else built in model.dtype."""
    if cfg.model.quantization != "none":
        folder = random_llama_folder(scratch / "llama-7b")
        return build_model(dataclasses.replace(cfg.model, source=folder), (), LLAMA_7B.vocab_size).model
    with torch.device(device):
        base = LlamaForCausalLM(LLAMA_7B).to(DTYPES.get(cfg.model.dtype, torch.bfloat16))
    for param in base.parameters():
        param.requires_grad_(False)
    return get_peft_model(base, lora_config(cfg.model, target_modules(cfg.model, base)))


def _worker(args: argparse.Namespace, mode: str, ledger_path: str, queue: multiprocessing.Queue) -> None:
    try:
        queue.put(one_mode(args, mode, ledger_path))
    except Exception as err:  # the parent reports it in one line
        queue.put({"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"})


def run(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="llm-throughput-") as folder:
        for rep in range(args.repeats):
            for mode in MODES[rep % 2 :] + MODES[: rep % 2]:
                queue = spawn.Queue()
                worker = spawn.Process(
                    target=_worker, args=(args, mode, str(Path(folder) / f"{mode}-{rep}.json"), queue)
                )
                worker.start()
                measured = queue.get()
                worker.join()
                if "error" in measured:
                    raise RuntimeError(measured["error"])
                results[mode].append(measured)
                console.print(
                    f"rep {rep + 1}/{args.repeats} {mode:11s} {measured['tokens_per_s']:8.1f} tokens/s, "
                    f"peak {measured['peak_gib']:.2f} GiB (+{measured['growth_gib']:.2f} while training)"
                )
    return results


def table(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> Table:
    memory = "peak CUDA GiB" if device_for(args.device).type == "cuda" else "peak RSS GiB"
    t = Table(
        title=(
            f"Causal-LM LoRA r={args.lora_r}, {args.model} ({args.dtype}, quantization {args.quantization}), "
            f"seq {args.seq_len}, batch {args.batch_size}"
            f"{f' in slices of {args.physical_batch_size}' if args.physical_batch_size else ''}, "
            f"checkpointing {'on' if args.gradient_checkpointing else 'off'}, {args.steps} steps x "
            f"{args.repeats} reps, {args.threads} threads"
        )
    )
    for name in ("mode", "tokens/s (median)", "ratio", "per rep", memory, "growth while training GiB"):
        t.add_column(name, justify="left" if name == "mode" else "right")
    base = [r["tokens_per_s"] for r in results["non-private"]]
    for mode, runs in results.items():
        rates = [r["tokens_per_s"] for r in runs]
        ratios = [a / b for a, b in zip(rates, base, strict=True)]
        t.add_row(
            mode,
            f"{statistics.median(rates):.1f}",
            f"{statistics.median(ratios):.2f}x",
            ", ".join(f"{r:.2f}" for r in ratios),
            f"{max(r['peak_gib'] for r in runs):.2f}",
            f"{max(r['growth_gib'] for r in runs):.2f}",
        )
    return t


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} llm_throughput", description=__doc__)
    ap.add_argument(
        "--model", default="smollm2", help="model.source, or llama-7b (random weights, for a GPU)"
    )
    ap.add_argument("--dtype", default="fp32", choices=("auto", *DTYPES), help="model.dtype of the base")
    ap.add_argument("--quantization", default="none", choices=("none", "8bit", "4bit-nf4"))
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--batch-size", type=int, default=8, help="expected batch size (Poisson under DP)")
    ap.add_argument("--physical-batch-size", type=int, default=None, help="training.physical_batch_size")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode and repetition")
    ap.add_argument("--repeats", type=int, default=2, help="repetitions, modes alternating")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per measuring process")
    return ap


def refuse_early(args: argparse.Namespace) -> None:
    """What would fail in every measuring process (a bad key, quantization without CUDA or
    bitsandbytes) fails here, in one line, before any starts."""
    probe = bench_config(args, "dp-hooks", "tiny-llama" if args.model == "llama-7b" else args.model)
    if args.model == "llama-7b":
        # Quantized as it loads from the folder the measuring process writes.
        probe = dataclasses.replace(probe, model=dataclasses.replace(probe.model, source="llama-7b"))
    quantization_config(probe.model)
    args.vocab = LLAMA_7B.vocab_size if args.model == "llama-7b" else len(load_tokenizer(probe.model))


def measure(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    refuse_early(args)
    try:
        results = run(args)
    except RuntimeError as err:
        console.print(f"error: {err}", highlight=False, markup=False)
        return 2
    report.print(table(results, args), width=160)
    console.print(f"total wall time {time.perf_counter() - start:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: measure(args))
