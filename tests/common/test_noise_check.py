"""The noise check's arithmetic (common.noise_check): a chi-square variance test of the noise added."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedlora.common.noise_check import FALSE_ALARM, NoiseSums, detectable, noise_check, samples_to_detect


def measured(rng: np.random.Generator, std: float, calibrated: float, steps: int, size: int) -> NoiseSums:
    total = NoiseSums()
    for _ in range(steps):
        noise = rng.normal(0.0, std, size)
        total += NoiseSums.of(float(noise @ noise), size, calibrated)
    return total


def test_correct_noise_passes_and_too_little_is_rejected():
    rng = np.random.default_rng(0)
    correct = noise_check(measured(rng, 1.5, 1.5, 20, 5000))
    assert correct.passed and correct.samples == 100_000
    assert correct.ratio == pytest.approx(1.0, abs=0.02)
    assert correct.ratio_interval[0] < 1.0 < correct.ratio_interval[1]
    assert correct.measured_std == pytest.approx(1.5, rel=0.02) and correct.calibrated_std == 1.5
    for scale in (0.0, 0.5, 0.95):
        broken = noise_check(measured(rng, 1.5 * scale, 1.5, 20, 5000))
        assert not broken.passed, scale
        assert broken.ratio == pytest.approx(scale, abs=0.02)
    assert noise_check(measured(rng, 3.0, 1.5, 20, 5000)).passed  # too much noise costs no privacy


def test_false_alarm_rate_and_power_are_what_the_check_states():
    """Under the null the statistic is chi-square, and the check fails exactly at its FALSE_ALARM
    quantile; a std ratio at detectable_ratio is caught 999 times in 1000 (1000 draws)."""
    samples = 2000
    edge = stats.chi2.ppf(FALSE_ALARM, samples)
    assert noise_check(NoiseSums(edge, samples, edge, samples)).p_value == pytest.approx(FALSE_ALARM)
    assert noise_check(NoiseSums(edge * 1.001, samples, edge, samples)).passed
    assert not noise_check(NoiseSums(edge * 0.999, samples, edge, samples)).passed
    rng = np.random.default_rng(1)
    null = rng.chisquare(samples, 1000)
    fails = sum(not noise_check(NoiseSums(s, samples, s, samples)).passed for s in null)
    assert fails <= 5, fails
    detectable = noise_check(NoiseSums(samples, samples, samples, samples)).detectable_ratio
    assert 0.9 < detectable < 0.95
    short = rng.chisquare(samples, 1000) * detectable**2
    caught = sum(not noise_check(NoiseSums(s, samples, s, samples)).passed for s in short)
    assert caught >= 995, caught


def test_rounds_with_different_sigma_add_up():
    a, b = NoiseSums.of(400.0, 100, 2.0), NoiseSums.of(100.0, 100, 1.0)
    total = a + b
    assert (total.statistic, total.samples) == (200.0, 200)
    check = noise_check(total)
    assert check.ratio == pytest.approx(1.0)
    assert check.calibrated_std == pytest.approx(np.sqrt(2.5))
    with pytest.raises(ValueError, match="positive"):
        NoiseSums.of(1.0, 1, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        noise_check(NoiseSums())


def test_samples_to_detect_is_the_fewest_whose_power_reaches_the_ratio():
    """One missing share of m = 10 (std ratio sqrt(0.9)) needs 6,884 noised values; of m = 3, 467."""
    for ratio, expected in ((np.sqrt(0.9), 6884), (np.sqrt(2 / 3), 467)):
        n = samples_to_detect(ratio)
        assert n == expected
        assert detectable(n) >= ratio > detectable(n - 1)
        assert noise_check(NoiseSums(n, n, n, n)).detectable_ratio == detectable(n)
    assert samples_to_detect(0.0) == 1
    with pytest.raises(ValueError, match="lies in"):
        samples_to_detect(1.0)
