"""Round 0 per person: the statistics head of institutions whose privacy unit is the person.

Run: ``python -m benchmarks person_stats [--sets triage rating medmcqa] [--seeds 3] [--epsilons 2 8]``

The frozen features of stats_head (cached, reused), the training rows grouped into synthetic patients
(simulations.synthetic_patients: 1 to 20 rows each, skewed, each patient within one class: the triage
condition, the rating, the subject), the patients shared out over ``--institutions`` by
Dirichlet(``--alpha``) label skew, so a patient stays inside one institution. Per epsilon (one release,
PRV at delta 1e-5, sensitivity sqrt 2 in its unit), the server's head (server.statistics_head: summed
release and label-name start) from:

- label names: what a person-level institution had before round 0 was per person (no release);
- per person: each patient's rows averaged (client.statistics.person_weights), epsilon per patient;
- per row: the same epsilon per row only (a patient with k rows protected at about k times it);
- per row, noise for the largest patient: the per-row release with its noise scaled by the largest
  patient's rows (sensitivity 20 sqrt 2), the per-patient guarantee without averaging.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.stats_head import (
    exact_statistics,
    feature_arguments,
    features,
    gaussian,
    public_start,
    scored,
    table,
)
from fedlora.client.statistics import person_weights
from fedlora.common.accounting import calibrate_noise
from fedlora.common.cli_support import report, run_cli
from fedlora.server.statistics_head import class_mean_head, summed, summed_variance
from fedlora.simulations.partitions import dirichlet_partition
from fedlora.simulations.synthetic_patients import patient_ids

DELTA = 1e-5
HEAD_SCALE = 20.0


def person_statistics(x: Tensor, y: Tensor, units: Tensor, classes: int) -> tuple[Tensor, Tensor]:
    """Class sums and counts with each patient's rows averaged, as client.statistics releases them."""
    weight = person_weights(units)
    unit = nn.functional.normalize(x.double(), dim=-1) * weight[:, None]
    sums = torch.zeros(classes, unit.shape[1], dtype=torch.float64).index_add_(0, y, unit)
    return sums, torch.zeros(classes, dtype=torch.float64).index_add_(0, y, weight)


def noisy_head(
    stats: list[tuple[Tensor, Tensor]], std: float, start: Tensor, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The server's head from every institution's release with Gaussian noise of ``std``."""
    released = [(s + gaussian(s.shape, std, gen), c + gaussian(c.shape, std, gen)) for s, c in stats]
    return class_mean_head(*summed(released), HEAD_SCALE, start, summed_variance([std] * len(stats)))


def run_set(name: str, args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    x_train, y_train, x_test, y_test, classes = features(name, Path(args.cache))
    start = public_start(name, Path(args.cache))
    names = scored((start, torch.zeros(classes)), x_test, y_test, classes)
    results: dict[str, list[tuple[float, float]]] = {"label names (no release)": []}
    for seed in range(args.seeds):
        results["label names (no release)"].append(names)
        units = torch.as_tensor(patient_ids(y_train.numpy(), seed))
        largest = int(torch.bincount(units).max())
        patients = torch.unique(units)
        patient_class = torch.zeros(int(units.max()) + 1, dtype=torch.int64).index_copy_(0, units, y_train)
        parts = dirichlet_partition(patient_class[patients].numpy(), args.institutions, args.alpha, seed)
        rows = [torch.isin(units, patients[torch.as_tensor(p)]).nonzero().flatten() for p in parts]
        per_person = [person_statistics(x_train[r], y_train[r], units[r], classes) for r in rows]
        per_row = [exact_statistics(x_train[r], y_train[r], classes)[:2] for r in rows]
        gen = torch.Generator().manual_seed(2000 + seed)
        for epsilon in args.epsilons:
            std = calibrate_noise(epsilon, DELTA, "prv", 1.0, 1) * math.sqrt(2)
            for label, stats, scale in (
                (f"per person, eps {epsilon:g} per patient", per_person, 1.0),
                (f"per row, eps {epsilon:g} per row only", per_row, 1.0),
                (f"per row, noise x {largest} (largest patient), eps {epsilon:g}", per_row, float(largest)),
            ):
                head = noisy_head(stats, std * scale, start, gen)
                results.setdefault(label, []).append(scored(head, x_test, y_test, classes))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = feature_arguments("person_stats", __doc__, seeds=3, epsilons=(2.0, 8.0))
    args = ap.parse_args(argv)

    def body() -> None:
        for name in args.sets:
            rows = f"patients, {args.institutions} institutions, Dirichlet {args.alpha:g}, {args.seeds} seeds"
            report.print(table(name, run_set(name, args), rows))

    return run_cli(body)
