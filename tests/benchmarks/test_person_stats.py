"""The person_stats benchmark releases what client.statistics releases per person."""

from __future__ import annotations

import torch

from benchmarks.person_stats import person_statistics
from benchmarks.stats_head import exact_statistics


def test_a_patient_counts_once_and_one_row_patients_are_the_per_row_statistics():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 4, generator=gen), torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    alone, alone_counts = person_statistics(x, y, torch.arange(9), 3)
    rows, row_counts, _ = exact_statistics(x, y, 3)
    assert torch.allclose(alone, rows) and torch.equal(alone_counts, row_counts)
    units = torch.tensor([5, 5, 5, 7, 8, 9, 9, 9, 9])  # one patient's three rows of class 0, ...
    sums, counts = person_statistics(x, y, units, 3)
    assert counts.tolist() == [1.0, 2.0, 1.0]
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    assert torch.allclose(sums[0], unit[:3].mean(0)) and torch.allclose(sums[2], unit[5:].mean(0))
