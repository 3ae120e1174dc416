"""The intervals every benchmark reports, against values computed by hand."""

from __future__ import annotations

import math

import pytest

from fedlora.simulations.stats import mean_interval, paired_difference, welch_difference

# Student's t quantiles (two-sided 95%), from tables: 2 and 4 degrees of freedom.
T_2, T_4 = 4.302653, 2.776445


def test_mean_interval_is_students_t_over_the_values():
    # mean 3, sample sd sqrt(2.5), standard error sqrt(2.5 / 5) = sqrt(0.5)
    est = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert est.mean == 3.0 and est.n == 5
    half = T_4 * math.sqrt(0.5)
    assert (est.low, est.high) == pytest.approx((3 - half, 3 + half), rel=1e-6)


def test_paired_difference_is_the_interval_of_the_seed_by_seed_differences():
    baseline, other = [0.70, 0.72, 0.74], [0.71, 0.75, 0.76]
    # differences 0.01, 0.03, 0.02: mean 0.02, sd 0.01, standard error 0.01 / sqrt(3)
    est = paired_difference(baseline, other)
    half = T_2 * 0.01 / math.sqrt(3)
    assert est.mean == pytest.approx(0.02)
    assert (est.low, est.high) == pytest.approx((0.02 - half, 0.02 + half), rel=1e-5)
    # The spread the pairs share cancels: unpaired, the same runs give a far wider interval.
    assert welch_difference(baseline, other).half_width > 1.3 * est.half_width


def test_identical_runs_differ_by_exactly_zero_and_one_run_has_no_interval():
    same = paired_difference([0.7, 0.8], [0.7, 0.8])
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    lone = mean_interval([0.7])
    assert lone.mean == 0.7 and math.isnan(lone.low) and math.isnan(lone.high)
    with pytest.raises(ValueError, match="2 baseline runs against 3"):
        paired_difference([0.1, 0.2], [0.1, 0.2, 0.3])
