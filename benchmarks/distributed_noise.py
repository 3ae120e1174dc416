"""The statistics head under local, distributed and centralised DP noise, on paired seeds.

Run: ``python -m benchmarks distributed_noise [--sets triage rating medmcqa] [--seeds 5]
[--epsilons 2 8]``

Per set and seed the training rows are split into ``--institutions`` by Dirichlet(``--alpha``) label
skew (the partition is the seed's, the same for every mode); each institution's exact class statistics
(stats_head's cached frozen MiniLM features) are released with the product's noise draw
(client.statistics.gaussian_release, Opacus' secure-mode draw) at sigma calibrated by PRV for one
release at epsilon (delta 1e-5), and the server's head (server.statistics_head, summed statistics
with the label names' start) is scored on the held-out rows:

- local noise: every institution adds the full sigma C (the federation without secure aggregation);
- distributed noise: every institution adds its share sigma C / sqrt(m), m = institutions
  (common.distributed_noise.NoiseSharing, no tolerated dropout or colluder), so the sum carries sigma C;
- centralised DP: one curator holding every row adds sigma C once.

Accuracy and macro-F1 with 95% intervals over seeds (simulations.stats.mean_interval), and the paired
differences distributed - local and distributed - centralised (simulations.stats.paired_difference).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from rich.table import Table

from benchmarks.stats_head import (
    DELTA,
    HEAD_SCALE,
    exact_statistics,
    feature_arguments,
    features,
    public_start,
    scored,
)
from fedlora.client.statistics import gaussian_release
from fedlora.common.accounting import calibrate_noise
from fedlora.common.cli_support import report, run_cli
from fedlora.common.distributed_noise import NoiseSharing
from fedlora.common.protocol import STATISTICS_SENSITIVITY
from fedlora.server.statistics_head import class_mean_head, summed, summed_variance
from fedlora.simulations.partitions import dirichlet_partition
from fedlora.simulations.stats import mean_interval, paired_difference

MODES = ("local noise", "distributed noise", "centralised DP")
Scores = dict[tuple[str, float], list[tuple[float, float]]]


def head_scores(
    stats: list[tuple[torch.Tensor, torch.Tensor]],
    stds: list[float],
    start: torch.Tensor,
    gen: torch.Generator,
    test: tuple[torch.Tensor, torch.Tensor, int],
) -> tuple[float, float]:
    """The server's head from the releases of ``stats`` with noise ``stds``, scored on ``test``."""
    released = [gaussian_release(s, c, std, gen) for (s, c), std in zip(stats, stds, strict=True)]
    head = class_mean_head(*summed(released), HEAD_SCALE, start, summed_variance(stds))
    return scored(head, *test)


def run_set(name: str, args: argparse.Namespace) -> Scores:
    x_train, y_train, x_test, y_test, classes = features(name, Path(args.cache))
    start = public_start(name, Path(args.cache))
    test = (x_test, y_test, classes)
    scores: Scores = {}
    for seed in range(args.seeds):
        parts = dirichlet_partition(y_train.numpy(), args.institutions, args.alpha, seed)
        local = [exact_statistics(x_train[p], y_train[p], classes)[:2] for p in parts]
        everyone = [exact_statistics(x_train, y_train, classes)[:2]]
        for epsilon in args.epsilons:
            sigma = calibrate_noise(epsilon, DELTA, "prv", 1.0, 1)
            full = sigma * STATISTICS_SENSITIVITY
            share = NoiseSharing(sigma, STATISTICS_SENSITIVITY, len(parts), 0, 0).share_std
            settings = ((local, [full] * len(parts)), (local, [share] * len(parts)), (everyone, [full]))
            for i, (mode, (stats, stds)) in enumerate(zip(MODES, settings, strict=True)):
                gen = torch.Generator().manual_seed(10_000 * seed + 100 * i + int(epsilon))
                scores.setdefault((mode, epsilon), []).append(head_scores(stats, stds, start, gen, test))
    return scores


def shown(values: list[float]) -> str:
    est = mean_interval(values)
    return f"{est.mean:.3f} [{est.low:.3f}, {est.high:.3f}]"


def difference(a: list[float], b: list[float]) -> str:
    """a - b, seed by seed."""
    est = paired_difference(b, a)
    return f"{est.mean:+.3f} [{est.low:+.3f}, {est.high:+.3f}]"


def table(name: str, scores: Scores, args: argparse.Namespace) -> Table:
    rows = f"{args.institutions} institutions, Dirichlet {args.alpha:g}, {args.seeds} paired seeds"
    out = Table(title=f"{name}: {rows}")
    for column in ("epsilon", "noise", "accuracy (95% CI)", "macro-F1 (95% CI)"):
        out.add_column(column)
    for epsilon in args.epsilons:
        for mode in MODES:
            values = scores[(mode, epsilon)]
            out.add_row(f"{epsilon:g}", mode, shown([a for a, _ in values]), shown([f for _, f in values]))
        mine = scores[(MODES[1], epsilon)]
        for other in (MODES[0], MODES[2]):
            theirs = scores[(other, epsilon)]
            out.add_row(
                f"{epsilon:g}",
                f"distributed - {other} (paired)",
                difference([a for a, _ in mine], [a for a, _ in theirs]),
                difference([f for _, f in mine], [f for _, f in theirs]),
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = feature_arguments("distributed_noise", __doc__, seeds=5, epsilons=(2.0, 8.0))
    args = ap.parse_args(argv)
    if args.institutions < 1 or not all(math.isfinite(e) and e > 0 for e in args.epsilons):
        ap.error("--institutions must be >= 1 and every epsilon a positive number")

    def body() -> None:
        for name in args.sets:
            report.print(table(name, run_set(name, args), args))

    return run_cli(body)
