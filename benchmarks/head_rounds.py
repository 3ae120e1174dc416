"""Head rounds on frozen features: statistics only against the statistics head followed by DP head
rounds, the planner's two choices where LoRA adds nothing, through the product's own functions.

Run: ``python -m benchmarks head_rounds [--sets triage rating medmcqa] [--seeds 3]``

Per set (drug-review triage, drug-review 3-class rating, MedMCQA subjects; the frozen MiniLM features
of benchmarks.stats_head, cached), per seed, the training rows are split into ``--institutions`` by
Dirichlet(``--alpha``) label skew. Statistics only: the one release spends the whole epsilon and the
server's head is final. With T head rounds planned, one noise multiplier sigma is
calibrated (client.recipe.head_noise: PRV, T + 1 steps at sample rate 1 spend epsilon at delta 1e-5);
every institution releases its class sums and counts at std sigma sqrt 2 (client.statistics) and the
server builds the statistics head (server.statistics_head). Then T rounds: each institution's clipped
head-gradient sum over all its rows (client.head_rounds.clipped_gradient_sum) plus local noise sigma
C (client.statistics.noisy), summed and divided by the released counts, one SGD step
(server.head_step). The learning rate (of ``--lrs``) is chosen per seed on a validation split of
the TRAINING rows (a fifth of each institution's rows held out; the run on the other four fifths),
never the test rows; the chosen rate then runs on every training row and is scored on the test rows.
Reported: accuracy and macro-F1 with 95% intervals over seeds (simulations.stats), the paired
difference from statistics only (same partitions and noise seeds), and the planner's head
signal-to-noise (client.recipe.head_snr) of a median institution, for the threshold MIN_HEAD_SNR.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from torch import Tensor, nn

from benchmarks.stats_head import (
    DELTA,
    HEAD_SCALE,
    exact_statistics,
    feature_arguments,
    features,
    public_start,
    scored,
)
from fedlora.client.head_rounds import clipped_gradient_sum
from fedlora.client.recipe import Institution, head_noise, head_snr
from fedlora.client.statistics import gaussian_release, noisy
from fedlora.common.cli_support import report, run_cli
from fedlora.common.head_gradient import CLIP, length
from fedlora.common.protocol import STATISTICS_SENSITIVITY
from fedlora.server.head_step import head_step, rows_in_sum, summed_gradient
from fedlora.server.statistics_head import class_mean_head, summed, summed_variance
from fedlora.simulations.partitions import dirichlet_partition
from fedlora.simulations.stats import mean_interval, paired_difference

Head = tuple[Tensor, Tensor]
Parts = list[tuple[Tensor, Tensor]]


def institution(rows: int, epsilon: float, rounds: int, peers: int, head_values: int) -> Institution:
    """What the planner knows of one institution of the benchmark (PRV, delta 1e-5)."""
    return Institution(
        rows=rows,
        labels=1,
        private=True,
        epsilon=epsilon,
        delta=DELTA,
        accountant="prv",
        rounds=rounds,
        examples_per_round=rows,
        peers=peers,
        head_values=head_values,
    )


def federated(
    parts: Parts, start: Tensor, classes: int, sigma: float, rounds: int, lr: float
) -> tuple[Head, Head]:
    """The statistics head and the head after ``rounds`` head rounds at ``lr`` (local noise; draws from
    torch's global RNG, seeded by the caller)."""
    releases = [
        gaussian_release(*exact_statistics(x, y, classes)[:2], sigma * STATISTICS_SENSITIVITY)
        for x, y in parts
    ]
    sums, counts = summed(releases)
    noise_var = summed_variance([sigma * STATISTICS_SENSITIVITY] * len(parts))
    weight, bias = class_mean_head(sums, counts, HEAD_SCALE, start, noise_var)
    first = (weight, bias)
    rows = rows_in_sum(float(counts.clamp(min=0).sum()), len(parts), len(parts))
    for _ in range(rounds):
        vectors = [noisy(clipped_gradient_sum(x, y, weight, bias, CLIP), sigma * CLIP) for x, y in parts]
        weight, bias = head_step(weight, bias, summed_gradient(vectors), rows, lr)
    return first, (weight, bias)


def fifths(parts: Parts, seed: int) -> tuple[Parts, Parts]:
    """Each institution's rows split four fifths to fit, one fifth to validate (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for x, y in parts:
        order = torch.randperm(len(y), generator=gen)
        cut = len(y) // 5
        held.append((x[order[:cut]], y[order[:cut]]))
        fit.append((x[order[cut:]], y[order[cut:]]))
    return fit, held


def run_set(name: str, args: argparse.Namespace) -> tuple[dict[str, list[tuple[float, float]]], list[str]]:
    x_train, y_train, x_test, y_test, classes = features(name, Path(args.cache))
    unit = nn.functional.normalize(x_train, dim=-1)
    start = public_start(name, Path(args.cache)).float()
    head_values = length(classes, unit.shape[1])
    results: dict[str, list[tuple[float, float]]] = {}
    notes = []
    splits = [
        dirichlet_partition(y_train.numpy(), args.institutions, args.alpha, s) for s in range(args.seeds)
    ]
    median_rows = int(np.median([len(p) for index in splits for p in index]))
    for epsilon in args.epsilons:
        # Statistics only: the planner's other choice, the whole budget on the one release.
        whole = head_noise(institution(1, epsilon, 0, 1, 1))
        for seed, index in enumerate(splits):
            parts = [(unit[p], y_train[p]) for p in index]
            torch.manual_seed(10_000 + seed)
            results.setdefault(f"statistics only, eps {epsilon:g}", []).append(
                scored(federated(parts, start, classes, whole, 0, 0.0)[0], x_test, y_test, classes)
            )
        for rounds in args.rounds:
            sigma = head_noise(institution(1, epsilon, rounds, 1, 1))
            chosen = []
            for seed, index in enumerate(splits):
                parts = [(unit[p], y_train[p]) for p in index]
                fit, held = fifths(parts, seed)
                x_val, y_val = torch.cat([x for x, _ in held]), torch.cat([y for _, y in held])
                best = max(
                    args.lrs,
                    key=lambda lr: _validated(fit, start, classes, sigma, rounds, lr, x_val, y_val, seed),
                )
                chosen.append(best)
                torch.manual_seed(10_000 + seed)
                first, last = federated(parts, start, classes, sigma, rounds, best)
                results.setdefault(f"  its round 0 (shared noise), eps {epsilon:g}, T {rounds}", []).append(
                    scored(first, x_test, y_test, classes)
                )
                results.setdefault(f"  statistics + {rounds} head rounds, eps {epsilon:g}", []).append(
                    scored(last, x_test, y_test, classes)
                )
            snr = head_snr(institution(median_rows, epsilon, rounds, args.institutions, head_values), sigma)
            notes.append(
                f"eps {epsilon:g}, T {rounds}: sigma {sigma:.3f} (statistics only {whole:.3f}), lr chosen on "
                f"validation {chosen}, head SNR of the median institution ({median_rows} rows) {snr:.1f}"
            )
    return results, notes


def _validated(
    fit: Parts,
    start: Tensor,
    classes: int,
    sigma: float,
    rounds: int,
    lr: float,
    x: Tensor,
    y: Tensor,
    seed: int,
) -> float:
    """Validation accuracy of the head rounds at ``lr`` on the fit rows (same noise seed for every lr)."""
    torch.manual_seed(20_000 + seed)
    return scored(federated(fit, start, classes, sigma, rounds, lr)[1], x, y, classes)[0]


def table(name: str, results: dict[str, list[tuple[float, float]]], rows: str) -> Table:
    out = Table(title=f"{name}: {rows}")
    for column in ("head", "accuracy (95% CI)", "macro-F1 (95% CI)", "accuracy vs statistics only"):
        out.add_column(column)

    def shown(values: list[float]) -> str:
        est = mean_interval(values)
        return f"{est.mean:.3f} [{est.low:.3f}, {est.high:.3f}]"

    base: list[float] = []
    for head, values in results.items():
        accuracy = [a for a, _ in values]
        if head.startswith("statistics only"):
            base, gain = accuracy, "-"
        else:
            diff = paired_difference(base, accuracy)
            gain = f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]"
        out.add_row(head, shown(accuracy), shown([f for _, f in values]), gain)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = feature_arguments("head_rounds", __doc__, seeds=3, epsilons=(2.0, 8.0))
    ap.add_argument("--rounds", type=int, nargs="+", default=[10, 30])
    ap.add_argument("--lrs", type=float, nargs="+", default=[2.0, 5.0, 20.0])
    args = ap.parse_args(argv)

    def body() -> None:
        for name in args.sets:
            results, notes = run_set(name, args)
            rows = (
                f"{args.institutions} institutions, Dirichlet {args.alpha:g}, {args.seeds} seeds, local noise"
            )
            report.print(table(name, results, rows))
            for note in notes:
                report.print(f"  {note}", highlight=False)

    return run_cli(body)
