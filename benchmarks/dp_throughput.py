"""Throughput of local LoRA training: non-private vs DP-SGD with Opacus hooks vs ghost clipping.

Run: ``python -m benchmarks dp_throughput [CONFIG] [--set K=V] [--steps 10 ...]``

The default config (pretrained MiniLM, LoRA, drug-review triage) is trained by `LocalTrainer` three
ways in one process. Each mode gets its own model (Opacus wraps a module once) and a warm-up round;
then the modes take turns step by step (each step a one-step `train_round`), the order rotated every
repetition, so bursts of load from other processes on a shared machine hit all modes alike.
Samples/s is the examples actually processed (Poisson batches vary under DP) over the seconds of the
training steps (ledger checks and accounting are outside the timer). The ratio (DP / non-private) is
the median of the per-repetition ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.table import Table

from benchmarks import PROG
from fedlora.client.ledger import PrivacyLedger
from fedlora.client.trainer import LocalTrainer
from fedlora.common.cli_support import add_config_arguments, console, read_config, report, run_cli
from fedlora.common.config import FedloraConfig
from fedlora.common.errors import ConfigError
from fedlora.common.model import build_model, device_for
from fedlora.common.workbench import prepare

MODES = ("non-private", "dp-hooks", "dp-ghost")


@dataclass
class Samples:
    mode: str
    rates: list[float] = field(default_factory=list)
    examples: int = 0
    seconds: float = 0.0
    steps: int = 0
    noise_multiplier: float | None = None


def mode_config(mode: str, args: argparse.Namespace, planned_rounds: int) -> FedloraConfig:
    overrides = [
        f"training.batch_size={args.batch_size}",
        "training.local_steps=1",
        f"training.seed={args.seed}",
        f"data.max_length={args.max_length}",
        f"privacy.planned_rounds={planned_rounds}",
    ]
    if mode == "non-private":
        overrides.append("privacy.enabled=false")
    else:
        overrides += ["privacy.enabled=true", f"privacy.grad_sample_mode={mode.removeprefix('dp-')}"]
    return read_config(args.config, [*args.set, *overrides], "institution")


def build_trainers(args: argparse.Namespace, folder: Path) -> dict[str, LocalTrainer]:
    # Warm-up + repetitions of ``steps`` one-step rounds: the ledger's budget covers them all.
    planned = (args.repeats + 1) * args.steps
    base = mode_config("non-private", args, planned)
    bench = prepare(base)
    device = device_for(base.training.device)
    trainers = {}
    for mode in MODES:
        cfg = mode_config(mode, args, planned)
        built = build_model(cfg.model, bench.labels, len(bench.tokenizer))
        ledger = None
        if cfg.privacy.enabled:
            ledger = PrivacyLedger.from_config(cfg.privacy, folder / f"{mode}-ledger.json")
        trainers[mode] = LocalTrainer(cfg, built.model, bench.data.train, device, ledger)
    return trainers


def interleaved(
    trainers: dict[str, LocalTrainer], steps: int, first_round: int, rep: int
) -> dict[str, tuple[int, float]]:
    """One repetition: ``steps`` one-step rounds of every trainer in turn, interleaved step by step
    (load from other processes comes in bursts of seconds) and the order rotated with ``rep``; the
    examples each saw and the seconds it trained."""
    names = list(trainers)
    order = names[rep % len(names) :] + names[: rep % len(names)]
    seen, seconds = dict.fromkeys(names, 0), dict.fromkeys(names, 0.0)
    for step in range(steps):
        for name in order:
            r = trainers[name].train_round(first_round + step, steps=1)
            seen[name] += r.examples_seen
            seconds[name] += r.seconds
    return {name: (seen[name], seconds[name]) for name in names}


def run(args: argparse.Namespace) -> dict[str, Samples]:
    torch.manual_seed(args.seed)
    results = {mode: Samples(mode) for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="dp-throughput-") as tmp:
        trainers = build_trainers(args, Path(tmp))
        for mode, trainer in trainers.items():
            results[mode].noise_multiplier = trainer.noise_multiplier
            start = time.perf_counter()
            trainer.train_round(0, steps=args.warmup_steps)
            console.print(f"warm-up {mode}: {args.warmup_steps} steps in {time.perf_counter() - start:.1f}s")
        for rep in range(args.repeats):
            measured = interleaved(trainers, args.steps, rep * args.steps + 1, rep)
            for mode, (seen, seconds) in measured.items():
                s = results[mode]
                s.rates.append(seen / seconds)
                s.examples += seen
                s.seconds += seconds
                s.steps += args.steps
                console.print(
                    f"rep {rep + 1}/{args.repeats} {mode:11s} {seen:4d} examples "
                    f"in {seconds:6.1f}s = {s.rates[-1]:6.2f} samples/s"
                )
    return results


def table(results: dict[str, Samples], args: argparse.Namespace) -> Table:
    base = results["non-private"].rates
    t = Table(
        title=(
            f"LocalTrainer throughput: MiniLM + LoRA, triage, batch {args.batch_size}, "
            f"max_length {args.max_length}, {args.steps} steps x {args.repeats} repetitions, "
            f"{torch.get_num_threads()} torch threads"
        )
    )
    columns = ("mode", "noise", "examples", "seconds", "samples/s (median)", "min-max", "ratio", "per rep")
    for name in columns:
        t.add_column(name, justify="left" if name == "mode" else "right")
    for mode, s in results.items():
        ratios = [a / b for a, b in zip(s.rates, base, strict=True)]
        t.add_row(
            mode,
            f"{s.noise_multiplier:.3f}" if s.noise_multiplier is not None else "-",
            str(s.examples),
            f"{s.seconds:.1f}",
            f"{statistics.median(s.rates):.2f}",
            f"{min(s.rates):.2f}-{max(s.rates):.2f}",
            f"{statistics.median(ratios):.2f}x",
            ", ".join(f"{r:.2f}" for r in ratios),
        )
    return t


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} dp_throughput", description=__doc__)
    add_config_arguments(ap, "institution")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per mode and repetition")
    ap.add_argument("--repeats", type=int, default=3, help="repetitions (modes interleaved)")
    ap.add_argument("--batch-size", type=int, default=32, help="expected batch size")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per example (data.max_length)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="untimed steps per mode first")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def measure(args: argparse.Namespace) -> int:
    if args.warmup_steps > args.steps:
        raise ConfigError(
            f"--warmup-steps: {args.warmup_steps} exceeds --steps {args.steps}; the privacy plan covers "
            "only --steps"
        )
    start = time.perf_counter()
    results = run(args)
    report.print(table(results, args), width=150)
    console.print(f"total wall time {time.perf_counter() - start:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: measure(args))
