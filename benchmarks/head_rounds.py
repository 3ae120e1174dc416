"""Head rounds on frozen features: statistics only against the statistics head followed by DP head
rounds, the planner's two choices where LoRA adds nothing, under local, distributed or centralised
noise, through the product's own functions.

Run: ``python -m benchmarks head_rounds [--sets triage rating medmcqa] [--seeds 3]
[--noise local distributed central] [--rounds 10 30]``

Per set (drug-review triage, drug-review 3-class rating, MedMCQA subjects; the frozen MiniLM features
of benchmarks.stats_head, cached), per seed, the training rows are split into ``--institutions`` by
Dirichlet(``--alpha``) label skew, the same partition for every noise mode. Statistics only: the one
release spends the whole epsilon and the server's head is final. With T head rounds planned, one noise
multiplier sigma is calibrated as the planner does (client.recipe.head_noise: PRV, T + 1 steps at
sample rate 1 spend epsilon at delta 1e-5); round 0 releases the class sums and counts (sensitivity
sqrt 2, client.statistics' noise draw) and the server builds the statistics head
(server.statistics_head). Then T rounds: each institution's clipped head-gradient sum over all its
rows (client.head_rounds.clipped_gradient_sum, clip 1), noised (client.statistics.noisy), summed and
divided by the released counts, one SGD step (server.head_step). Noise modes (``--noise``):

- local: every institution adds sigma C to its release and to each gradient sum (the plain path: the
  coordinator sees every reply);
- distributed: every institution adds its share sigma C / sqrt(m), m = institutions
  (common.distributed_noise.NoiseSharing, no tolerated dropout or colluder), so the sum carries sigma
  C once. Secure aggregation's masks cancel exactly in the ring, so the benchmark sums the noisy shares
  in the clear: that is the sum the protocol unmasks, up to its fixed-point quantisation (40-bit
  levels, far below the noise), which is not simulated;
- central: one curator holding every row adds sigma C once to the exact sum.

Every mode draws from torch's global RNG seeded per seed, so local and distributed draw the same
standard normals (scaled): the paired differences compare the noise levels, not two noise draws.

The learning rate (of ``--lrs``) is chosen per seed and mode on a validation split of the TRAINING rows
(a fifth of each institution's rows held out; the run on the other four fifths), never the test rows;
the chosen rate then runs on every training row and is scored on the test rows. Reported: accuracy
and macro-F1 with 95% intervals over seeds (simulations.stats), the paired differences (accuracy and
macro-F1; same partitions and noise seeds) between the modes' heads, and the planner's head
signal-to-noise (client.recipe.head_snr) of a median institution at its own noise and at the sum's
(distributed: each share's multiplier sigma / sqrt(m), as if every institution's gradient carried
it), for the threshold MIN_HEAD_SNR; and each set's wall time.

Recorded 2026-12-05 (docs/results.md, "Head rounds under distributed noise"): 5 paired seeds, T 10,
every mode, eps 2 and 8, on the project's shared 2-core machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from torch import Tensor, nn

from benchmarks.distributed_noise import difference, shown
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
from fedlora.common.distributed_noise import NoiseSharing
from fedlora.common.head_gradient import CLIP, length
from fedlora.common.protocol import STATISTICS_SENSITIVITY
from fedlora.server.head_step import head_step, rows_in_sum, summed_gradient
from fedlora.server.statistics_head import class_mean_head, summed, summed_variance
from fedlora.simulations.partitions import dirichlet_partition

Head = tuple[Tensor, Tensor]
Parts = list[tuple[Tensor, Tensor]]
MODES = ("local", "distributed", "central")
STATS, ROUND0, ROUNDS = "statistics only", "its round 0", "head rounds"
Key = tuple[str, str, float, int]
"""(mode, head, epsilon, rounds; 0 for statistics only)."""
Scores = dict[Key, list[tuple[float, float]]]
COMPARISONS = (
    (("local", ROUNDS), ("local", STATS)),
    (("distributed", ROUNDS), ("distributed", STATS)),
    (("central", ROUNDS), ("central", STATS)),
    (("distributed", STATS), ("local", STATS)),
    (("distributed", ROUNDS), ("local", STATS)),
    (("central", ROUNDS), ("local", STATS)),
    (("distributed", STATS), ("central", STATS)),
    (("distributed", ROUNDS), ("central", ROUNDS)),
)
"""Paired differences (head, minus head) shown where both modes ran: head rounds against statistics
only in each mode; distributed against the issue's baseline (local statistics only, what the product
runs without secure aggregation) and against centralised DP; centralised head rounds, the ceiling."""


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


def noise_stds(mode: str, sigma: float, sensitivity: float, institutions: int) -> list[float]:
    """The std each party adds to its vector: local, every institution sigma C; distributed, every
    institution its share sigma C / sqrt(m); central, the one curator sigma C on the exact sum."""
    if mode == "distributed":
        return [NoiseSharing(sigma, sensitivity, institutions, 0, 0).share_std] * institutions
    return [sigma * sensitivity] * (institutions if mode == "local" else 1)


def federated(
    parts: Parts, start: Tensor, classes: int, sigma: float, rounds: int, lr: float, mode: str = "local"
) -> tuple[Head, Head]:
    """The statistics head and the head after ``rounds`` head rounds at ``lr``, with ``mode``'s noise
    (draws from torch's global RNG, seeded by the caller)."""
    stats = [exact_statistics(x, y, classes)[:2] for x, y in parts]
    if mode == "central":
        stats = [summed(stats)]
    stds = noise_stds(mode, sigma, STATISTICS_SENSITIVITY, len(parts))
    releases = [gaussian_release(s, c, std) for (s, c), std in zip(stats, stds, strict=True)]
    sums, counts = summed(releases)
    weight, bias = class_mean_head(sums, counts, HEAD_SCALE, start, summed_variance(stds))
    first = (weight, bias)
    rows = rows_in_sum(float(counts.clamp(min=0).sum()), len(parts), len(parts))
    gradient_stds = noise_stds(mode, sigma, CLIP, len(parts))
    for _ in range(rounds):
        exact = [clipped_gradient_sum(x, y, weight, bias, CLIP) for x, y in parts]
        if mode == "central":
            exact = [summed_gradient(exact)]
        vectors = [noisy(v, std) for v, std in zip(exact, gradient_stds, strict=True)]
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


def run_set(name: str, args: argparse.Namespace) -> tuple[Scores, list[str]]:
    x_train, y_train, x_test, y_test, classes = features(name, Path(args.cache))
    unit = nn.functional.normalize(x_train, dim=-1)
    start = public_start(name, Path(args.cache)).float()
    head_values = length(classes, unit.shape[1])
    results: Scores = {}
    notes = []
    splits = [
        dirichlet_partition(y_train.numpy(), args.institutions, args.alpha, s) for s in range(args.seeds)
    ]
    median_rows = int(np.median([len(p) for index in splits for p in index]))
    for epsilon in args.epsilons:
        # Statistics only: the planner's other choice, the whole budget on the one release.
        whole = head_noise(institution(1, epsilon, 0, 1, 1))
        for mode in args.noise:
            for seed, index in enumerate(splits):
                parts = [(unit[p], y_train[p]) for p in index]
                torch.manual_seed(10_000 + seed)
                results.setdefault((mode, STATS, epsilon, 0), []).append(
                    scored(federated(parts, start, classes, whole, 0, 0.0, mode)[0], x_test, y_test, classes)
                )
        for rounds in args.rounds:
            sigma = head_noise(institution(1, epsilon, rounds, 1, 1))
            chosen: dict[str, list[float]] = {}
            for mode in args.noise:
                for seed, index in enumerate(splits):
                    parts = [(unit[p], y_train[p]) for p in index]
                    fit, held = fifths(parts, seed)
                    x_val, y_val = torch.cat([x for x, _ in held]), torch.cat([y for _, y in held])
                    best = max(
                        args.lrs,
                        key=lambda lr: _validated(
                            fit, start, classes, sigma, rounds, lr, mode, (x_val, y_val), seed
                        ),
                    )
                    chosen.setdefault(mode, []).append(best)
                    torch.manual_seed(10_000 + seed)
                    first, last = federated(parts, start, classes, sigma, rounds, best, mode)
                    results.setdefault((mode, ROUND0, epsilon, rounds), []).append(
                        scored(first, x_test, y_test, classes)
                    )
                    results.setdefault((mode, ROUNDS, epsilon, rounds), []).append(
                        scored(last, x_test, y_test, classes)
                    )
            median = institution(median_rows, epsilon, rounds, args.institutions, head_values)
            share = NoiseSharing(sigma, CLIP, args.institutions, 0, 0).share_multiplier
            snr, summed_snr = head_snr(median, sigma), head_snr(median, share)
            notes.append(
                f"eps {epsilon:g}, T {rounds}: sigma {sigma:.3f} (statistics only {whole:.3f}), lr chosen on "
                f"validation {chosen}; head SNR of the median institution ({median_rows} rows): local noise "
                f"{snr:.1f}, the sum's noise (share {share:.3f}) {summed_snr:.1f}"
            )
    return results, notes


def _validated(
    fit: Parts,
    start: Tensor,
    classes: int,
    sigma: float,
    rounds: int,
    lr: float,
    mode: str,
    held: tuple[Tensor, Tensor],
    seed: int,
) -> float:
    """Validation accuracy of the head rounds at ``lr`` on the fit rows (same noise seed for every lr)."""
    torch.manual_seed(20_000 + seed)
    return scored(federated(fit, start, classes, sigma, rounds, lr, mode)[1], *held, classes)[0]


def table(name: str, results: Scores, args: argparse.Namespace, rows: str) -> Table:
    out = Table(title=f"{name}: {rows}")
    for column in ("epsilon", "T", "head", "accuracy (95% CI)", "macro-F1 (95% CI)"):
        out.add_column(column)
    for epsilon in args.epsilons:
        for rounds in args.rounds:

            def key(mode: str, head: str, e: float = epsilon, t: int = rounds) -> Key:
                return (mode, head, e, 0 if head == STATS else t)

            for mode in args.noise:
                for head in (STATS, ROUND0, ROUNDS):
                    values = results[key(mode, head)]
                    label = f"{mode}: {head}" if head != ROUND0 else f"{mode}:   {head} (shared noise)"
                    accuracy, f1 = shown([a for a, _ in values]), shown([f for _, f in values])
                    out.add_row(f"{epsilon:g}", str(rounds), label, accuracy, f1)
            for (mode, head), (base_mode, base_head) in COMPARISONS:
                if mode in args.noise and base_mode in args.noise:
                    mine, theirs = results[key(mode, head)], results[key(base_mode, base_head)]
                    out.add_row(
                        f"{epsilon:g}",
                        str(rounds),
                        f"{mode} {head} - {base_mode} {base_head} (paired)",
                        difference([a for a, _ in mine], [a for a, _ in theirs]),
                        difference([f for _, f in mine], [f for _, f in theirs]),
                    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = feature_arguments("head_rounds", __doc__, seeds=3, epsilons=(2.0, 8.0))
    ap.add_argument("--rounds", type=int, nargs="+", default=[10, 30])
    ap.add_argument("--lrs", type=float, nargs="+", default=[2.0, 5.0, 20.0])
    ap.add_argument(
        "--noise", nargs="+", choices=MODES, default=["local"], help="noise modes, on the same seeds"
    )
    args = ap.parse_args(argv)
    if args.institutions < 1 or args.seeds < 1 or any(t < 1 for t in args.rounds):
        ap.error("--institutions, --seeds and every --rounds must be >= 1")

    def body() -> None:
        for name in args.sets:
            began = time.perf_counter()
            results, notes = run_set(name, args)
            rows = f"{args.institutions} institutions, Dirichlet {args.alpha:g}, {args.seeds} paired seeds"
            report.print(table(name, results, args, rows))
            for note in notes:
                report.print(f"  {note}", highlight=False)
            report.print(f"  {name}: {time.perf_counter() - began:.0f} s wall", highlight=False)

    return run_cli(body)
