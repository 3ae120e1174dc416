"""Person-level vs row-level DP on the drug reviews grouped into synthetic patients
(fedlora.simulations.synthetic_patients: 1 to 20 reviews each, skewed; not real patients).

Run: ``python -m benchmarks privacy_unit [CONFIG] [--set K=V] [--rounds 5]
[--seeds 0 1] [--caps 8 1] [--settings person row row-group] [--throughput-steps 6]``

Accuracy: one institution trains the planned rounds with `LocalTrainer` (the recipe planner's values,
noise calibrated for exactly those rounds) in three settings, then scores the held-out reviews:

- person: data.privacy_unit, epsilon E per person (delta D);
- row: epsilon E per row, so a patient with k reviews is protected only at about k x E;
- row, group-equivalent: the per-row (epsilon, delta) that protects the largest patient (k reviews)
  as the person setting does, by group privacy ((e, d) per row gives (k e, k exp((k - 1) e) d) for k
  rows): epsilon E / k and delta D / (k exp((k - 1) E / k)).

Throughput: person-level and row-level DP trainers on the same data take turns step by step (each
step a one-step round, the order rotated every repetition, as in dp_throughput); rows/s are the rows
a step processed over its seconds; the ratio is the median of the per-repetition ratios.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.table import Table

from benchmarks import PROG
from benchmarks.dp_throughput import interleaved
from fedlora.client.ledger import PrivacyLedger
from fedlora.client.privacy_unit import unit_counts
from fedlora.client.trainer import LocalTrainer
from fedlora.common.cli_support import add_config_arguments, console, read_config, report, run_cli
from fedlora.common.config import FedloraConfig
from fedlora.common.model import build_model, device_for
from fedlora.common.scoring import evaluate
from fedlora.common.workbench import Workbench, prepare
from fedlora.simulations.synthetic_patients import COLUMN, LARGEST, write_drug_reviews_with_patients


@dataclass(frozen=True)
class Setting:
    name: str
    epsilon: float
    delta: float
    per_person: bool
    cap: int = 0
    """data.max_rows_per_unit of a person setting."""


@dataclass
class Outcome:
    setting: Setting
    accuracies: list[float] = field(default_factory=list)
    noise: float | None = None
    spent: list[float] = field(default_factory=list)
    batch: int = 0
    steps: int = 0


def settings(args: argparse.Namespace, largest: int) -> list[Setting]:
    """The chosen settings (--settings), a person setting per cap (--caps)."""
    epsilon, delta, group = args.epsilon, args.delta, args.epsilon / largest
    every = {
        "person": [Setting(f"person, cap {c}", epsilon, delta, True, c) for c in args.caps],
        "row": [Setting("row", epsilon, delta, False)],
        "row-group": [
            Setting(
                "row, group-equivalent", group, delta / (largest * math.exp((largest - 1) * group)), False
            )
        ],
    }
    return [s for name in args.settings for s in every[name]]


def setting_config(
    args: argparse.Namespace, s: Setting, paths: tuple[Path, Path], extra: list[str]
) -> FedloraConfig:
    overrides = [
        f"data.path={paths[0]}",
        f"data.eval_path={paths[1]}",
        # Exponent and point, so YAML reads numbers as numbers.
        f"privacy.epsilon={s.epsilon:.6e}",
        f"privacy.delta={s.delta:.6e}",
        "privacy.enabled=true",
        *([f"data.privacy_unit={COLUMN}", f"data.max_rows_per_unit={s.cap}"] if s.per_person else []),
        *extra,
    ]
    return read_config(args.config, [*args.set, *overrides], "institution")


def trainer_for(cfg: FedloraConfig, folder: Path, name: str) -> tuple[LocalTrainer, Workbench]:
    bench = prepare(cfg)
    built = build_model(cfg.model, bench.labels, len(bench.tokenizer))
    ledger = PrivacyLedger.from_config(cfg.privacy, folder / f"{name}-{time.time_ns()}.json")
    device = device_for(cfg.training.device)
    # one institution alone, as train-local: no round 0, the planned rounds spend the whole budget
    return LocalTrainer(cfg, built.model, bench.data.train, device, ledger, round_zero=False), bench


def accuracy(args: argparse.Namespace, paths: tuple[Path, Path], folder: Path) -> list[Outcome]:
    outcomes = [Outcome(s) for s in settings(args, LARGEST)]
    for seed in args.seeds:
        for o in outcomes:
            extra = [f"privacy.planned_rounds={args.rounds}", f"training.seed={seed}"]
            cfg = setting_config(args, o.setting, paths, extra)
            torch.manual_seed(seed)
            trainer, bench = trainer_for(cfg, folder, "accuracy")
            for r in range(1, args.rounds + 1):
                trainer.train_round(r)
            metrics = evaluate(trainer.model, cfg.model.task, bench.data.eval, trainer.device, 64)
            trainer.close()
            o.accuracies.append(metrics["accuracy"])
            o.spent.append(trainer.ledger.spent)
            o.noise, o.batch, o.steps = (
                trainer.noise_multiplier,
                trainer.cfg.training.batch_size,
                trainer.cfg.training.local_steps,
            )
            console.print(
                f"seed {seed} {o.setting.name}: held-out accuracy {metrics['accuracy']:.3f} "
                f"(noise {o.noise:.3f}, batch {o.batch}, {o.steps} steps x {args.rounds} rounds, "
                f"epsilon spent {trainer.ledger.spent:.3f})"
            )
    return outcomes


def throughput(args: argparse.Namespace, paths: tuple[Path, Path], folder: Path) -> dict[str, list[float]]:
    """Rows/s of person-level and row-level DP, interleaved step by step."""
    planned = (args.repeats + 1) * args.throughput_steps
    trainers = {}
    chosen = settings(args, LARGEST)
    pair = [next(s for s in chosen if s.per_person), next(s for s in chosen if s.name == "row")]
    for s in pair:
        extra = ["training.local_steps=1", f"privacy.planned_rounds={planned}", "training.seed=0"]
        trainers[s.name], _ = trainer_for(setting_config(args, s, paths, extra), folder, "throughput")
    for trainer in trainers.values():
        trainer.train_round(0, steps=args.throughput_steps)  # warm-up, untimed
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    for rep in range(args.repeats):
        measured = interleaved(trainers, args.throughput_steps, rep * args.throughput_steps + 1, rep)
        for name, (seen, seconds) in measured.items():
            rates[name].append(seen / seconds)
        console.print(
            f"throughput rep {rep + 1}/{args.repeats}: "
            + ", ".join(f"{n} {rates[n][-1]:.2f} rows/s" for n in trainers)
        )
    for trainer in trainers.values():
        trainer.close()
    return rates


def tables(
    args: argparse.Namespace,
    outcomes: list[Outcome],
    rates: dict[str, list[float]],
    counts: str,
    start_accuracy: float,
) -> list[Table]:
    acc = Table(
        title=f"Held-out accuracy, drug-review triage, synthetic patients ({counts}), {args.rounds} rounds"
    )
    for name in (
        "setting",
        "guarantee",
        "per-row (epsilon, delta)",
        "noise",
        "batch x steps",
        "accuracy per seed",
        "mean",
    ):
        acc.add_column(name, justify="left" if name in ("setting", "guarantee") else "right")
    for o in outcomes:
        s = o.setting
        if s.per_person:
            guarantee = f"epsilon {s.epsilon:g} per person"
            per_row = "-"
        else:
            worst = LARGEST * s.epsilon
            guarantee = f"epsilon {s.epsilon:.3g} per row; a {LARGEST}-review patient: {worst:.3g}"
            per_row = f"({s.epsilon:.3g}, {s.delta:.2g})"
        acc.add_row(
            s.name,
            guarantee,
            per_row,
            f"{o.noise:.3f}",
            f"{o.batch} {'persons' if s.per_person else 'rows'} x {o.steps}",
            ", ".join(f"{a:.3f}" for a in o.accuracies),
            f"{statistics.mean(o.accuracies):.3f}",
        )
    acc.add_row("before training", "no spend", "-", "-", "-", "-", f"{start_accuracy:.3f}")
    if not rates:
        return [acc]
    speed = Table(
        title=f"DP throughput, {args.throughput_steps} one-step rounds x {args.repeats} repetitions, "
        "interleaved"
    )
    for name in ("setting", "rows/s (median)", "per rep", "ratio to row-level"):
        speed.add_column(name, justify="left" if name == "setting" else "right")
    row = rates["row"]
    for name, values in rates.items():
        ratios = [a / b for a, b in zip(values, row, strict=True)]
        speed.add_row(
            name,
            f"{statistics.median(values):.2f}",
            ", ".join(f"{v:.2f}" for v in values),
            f"{statistics.median(ratios):.2f}x",
        )
    return [acc, speed]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} privacy_unit", description=__doc__)
    add_config_arguments(ap, "institution")
    ap.add_argument("--epsilon", type=float, default=8.0, help="the budget E (per person, and per row)")
    ap.add_argument("--delta", type=float, default=1e-5, help="the delta D of the person and row settings")
    ap.add_argument("--rounds", type=int, default=5, help="local rounds each setting trains")
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="training seeds (one run of each setting per seed)"
    )
    ap.add_argument(
        "--settings",
        nargs="+",
        default=["person", "row", "row-group"],
        choices=["person", "row", "row-group"],
        help="which settings train (throughput needs person and row)",
    )
    ap.add_argument(
        "--caps", type=int, nargs="+", default=[8], help="data.max_rows_per_unit of the person settings"
    )
    ap.add_argument(
        "--throughput-steps", type=int, default=6, help="one-step rounds per repetition; 0: no throughput"
    )
    ap.add_argument("--repeats", type=int, default=3, help="throughput repetitions")
    return ap


def measure(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    base = read_config(args.config, args.set, "institution")
    with tempfile.TemporaryDirectory(prefix="privacy-unit-") as tmp:
        folder = Path(tmp)
        paths = write_drug_reviews_with_patients(base.data, folder / "data", seed=0)
        probe = setting_config(
            args, Setting("probe", args.epsilon, args.delta, True, args.caps[0]), paths, []
        )
        bench = prepare(probe)
        units = bench.data.train.units
        untrained = build_model(probe.model, bench.labels, len(bench.tokenizer)).model
        start_accuracy = evaluate(untrained, probe.model.task, bench.data.eval, device_for("cpu"), 64)[
            "accuracy"
        ]
        console.print(
            f"before training (the shared head, model.head_init): held-out accuracy {start_accuracy:.3f}"
        )
        c = unit_counts(units, probe.data.max_rows_per_unit)
        counts = (
            f"{c.persons} patients, {c.rows} reviews, per patient min {c.min_rows} / median "
            f"{c.median_rows:g} / max {c.max_rows}, cap {c.cap}"
        )
        console.print(counts)
        outcomes = accuracy(args, paths, folder)
        rates = throughput(args, paths, folder) if args.throughput_steps > 0 else {}
    for t in tables(args, outcomes, rates, counts, start_accuracy):
        report.print(t, width=170)
    console.print(f"total wall time {time.perf_counter() - start:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: measure(args))
