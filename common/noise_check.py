"""The privacy audit's direct test of the noise DP-SGD added: is it the calibrated sigma x C?

At every DP step the auditor knows what the step's gradient sum must be before noise (each example's
gradient clipped to C and summed, recomputed independently of the optimizer: client.noise_probe), so
the released sum minus that is the noise actually added. Under a correct implementation every
coordinate of it is an independent N(0, (sigma C)^2), sigma the noise multiplier the ledger records.
Then the sum over all coordinates and steps of (noise / (sigma C))^2 is chi-square with as many
degrees of freedom as there were coordinates x steps (millions in a typical audit). The check rejects
when that statistic is too small: the lower tail of the chi-square at FALSE_ALARM, so a correct
implementation fails it with probability FALSE_ALARM, and one that adds too little noise (zero, half)
fails it with overwhelming probability. Too much noise costs utility, not privacy: it passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

FALSE_ALARM = 1e-3
"""The probability that a correct implementation fails the check."""


@dataclass(frozen=True)
class NoiseSums:
    """Sums over DP steps (or rounds) of what the check needs; they add up across rounds."""

    statistic: float = 0.0
    """Sum of (added noise / calibrated std)^2 over every coordinate of every step."""
    samples: int = 0
    """Coordinates x steps: the chi-square's degrees of freedom."""
    squares: float = 0.0
    """Sum of (added noise)^2."""
    calibrated: float = 0.0
    """Sum of the calibrated variance (sigma C)^2 over the same samples."""

    @classmethod
    def of(cls, squares: float, samples: int, std: float) -> NoiseSums:
        """Steps that all had the calibrated ``std`` (sigma x C): ``squares`` summed over ``samples``."""
        if std <= 0 or not math.isfinite(std):
            raise ValueError(f"the calibrated noise std must be positive and finite, got {std}")
        return cls(squares / std**2, samples, squares, samples * std**2)

    def __add__(self, other: NoiseSums) -> NoiseSums:
        return NoiseSums(
            self.statistic + other.statistic,
            self.samples + other.samples,
            self.squares + other.squares,
            self.calibrated + other.calibrated,
        )


@dataclass(frozen=True)
class NoiseCheck:
    samples: int
    calibrated_std: float
    """sigma x C (the root mean square over steps, should the ledger's sigma change between rounds)."""
    measured_std: float
    """The root mean square of the noise actually added."""
    ratio: float
    """Measured over calibrated std, noise-weighted per step: 1 for a correct implementation."""
    ratio_interval: tuple[float, float]
    """Where the true ratio lies, at confidence 1 - FALSE_ALARM (two-sided)."""
    statistic: float
    p_value: float
    """P[chi-square(samples) <= statistic]: how likely this little noise is if sigma x C was added."""
    false_alarm: float
    detectable_ratio: float
    """The largest std ratio this many samples reject with probability 1 - false_alarm (the power)."""
    passed: bool
    """p_value >= false_alarm."""


def noise_check(sums: NoiseSums, false_alarm: float = FALSE_ALARM) -> NoiseCheck:
    """The one-sided chi-square variance test of the added noise against the calibrated std."""
    if sums.samples < 1:
        raise ValueError("a noise check needs at least one noised coordinate")
    if not 0 < false_alarm < 1:
        raise ValueError(f"false_alarm must lie in (0, 1), got {false_alarm}")
    n, stat = sums.samples, sums.statistic
    chi2 = stats.chi2(n)
    low, high = chi2.ppf(1 - false_alarm / 2), chi2.ppf(false_alarm / 2)
    p_value = float(chi2.cdf(stat))
    return NoiseCheck(
        samples=n,
        calibrated_std=math.sqrt(sums.calibrated / n),
        measured_std=math.sqrt(sums.squares / n),
        ratio=math.sqrt(stat / n),
        ratio_interval=(math.sqrt(stat / low), math.sqrt(stat / high)),
        statistic=stat,
        p_value=p_value,
        false_alarm=false_alarm,
        detectable_ratio=detectable(n, false_alarm),
        passed=p_value >= false_alarm,
    )


def detectable(samples: int, false_alarm: float = FALSE_ALARM) -> float:
    """The largest std ratio that ``samples`` coordinates reject with probability 1 - false_alarm."""
    chi2 = stats.chi2(samples)
    return math.sqrt(chi2.ppf(false_alarm) / chi2.ppf(1 - false_alarm))


def samples_to_detect(ratio: float, false_alarm: float = FALSE_ALARM) -> int:
    """The fewest noised coordinates whose check rejects a std ``ratio`` (< 1) of the calibrated one
    with probability 1 - false_alarm: what an audit needs to catch, say, one missing noise share."""
    if not 0 <= ratio < 1:
        raise ValueError(f"a detectable std ratio lies in [0, 1), got {ratio}")
    low, high = 1, 2
    while detectable(high, false_alarm) < ratio:
        low, high = high, 2 * high
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if detectable(middle, false_alarm) >= ratio else (middle + 1, high)
    return low
