"""Differences between settings, with their 95% intervals: DP noise moves every run, so a gap is only
worth reading next to its interval.

Runs on the same seeds (simulation.reproducible: the same partition, sampling and noise streams for
every setting) are compared pair by pair: the spread the settings share cancels, and the interval
of the mean paired difference is Student's t over seeds. Unpaired runs get Welch's interval.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean and its interval; NaN bounds when the runs cannot give one (fewer than two)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """The mean of ``values`` with Student's t interval (n - 1 degrees of freedom). No spread at all
    (identical runs) is an interval of width zero, not an unknown one."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval of no values")
    mean = statistics.fmean(values)
    if n < 2:
        return Estimate(mean, math.nan, math.nan, n)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n)


def paired_difference(
    baseline: Sequence[float], other: Sequence[float], confidence: float = CONFIDENCE
) -> Estimate:
    """``other`` minus ``baseline``, seed by seed (the i-th values of both ran on the same seed)."""
    if len(baseline) != len(other):
        raise ValueError(f"paired_difference: {len(baseline)} baseline runs against {len(other)}")
    return mean_interval([o - b for b, o in zip(baseline, other, strict=True)], confidence)


def welch_difference(
    baseline: Sequence[float], other: Sequence[float], confidence: float = CONFIDENCE
) -> Estimate:
    """``other`` minus ``baseline`` in their means, runs unpaired (unseeded noise), with Welch's
    interval; NaN bounds with fewer than two runs a side, or no spread at all."""
    gap = statistics.fmean(other) - statistics.fmean(baseline)
    n = min(len(baseline), len(other))
    if n < 2 or statistics.variance(other) + statistics.variance(baseline) == 0:
        return Estimate(gap, math.nan, math.nan, n)
    interval = stats.ttest_ind(other, baseline, equal_var=False).confidence_interval(confidence)
    return Estimate(gap, float(interval.low), float(interval.high), n)
