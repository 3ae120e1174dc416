"""The epsilon a privacy audit proves, from one training run (Steinke, Nasr and Jagielski, "Privacy
Auditing with One (1) Training Run", NeurIPS 2023).

m canaries are each included independently with probability 1/2. The auditor guesses "in" for the
k+ highest scores and "out" for the k- lowest, and abstains on the rest; v of its r = k+ + k- guesses
are right. Under (epsilon, delta)-DP the paper's theorem bounds how likely v or more right guesses
are: at most P[Binomial(r, e^eps / (1 + e^eps)) >= v] plus a delta term of 2 m delta alpha, alpha
from the binomial's mass just below v (the p-value of their approximate-DP theorem, computed as in
their appendix). The epsilon lower bound at confidence 1 - p is the largest epsilon that this p-value
still rejects. Implemented here from the paper (scipy's binomial only), so that every step is ours
to test.

Choice of k: the bound is computed for a fixed grid of symmetric guess counts (k+ = k- = m/2, m/4,
... m/32) and the largest is reported. Trying several k and keeping the best is a multiple test, so
each k is evaluated at confidence 1 - p / (number of k tried) (Bonferroni): the reported bound holds
at the stated confidence. The ceiling is the bound had every guess been right, at the best k: what
this many canaries can prove at most, whatever the noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
GUESS_FRACTIONS = (2, 4, 8, 16, 32)
"""k+ = k- = m // f for f in these: r = m, m/2, ... m/16 guesses."""
BISECTION_STEPS = 40


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of v or more right guesses out of r (m canaries) under (epsilon, delta)-DP."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomised response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha = 0.0
    if v > 0:
        # sum_i = P[v > Binomial(r, q) >= v - i]; alpha = max_i sum_i / i
        below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
        alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = CONFIDENCE) -> float:
    """The largest epsilon the audit rejects at ``confidence``: v right guesses out of r (m canaries)
    would be that unlikely under (epsilon, delta)-DP. 0 when not even epsilon 0 is rejected."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:
        low, high = high, 2 * high
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(m, r, v, middle, delta) < level else (low, middle)
    return low


def right_guesses(scores: Sequence[float], included: Sequence[bool], k_plus: int, k_minus: int) -> int:
    """Guess "in" for the k+ highest scores and "out" for the k- lowest; how many are right. Ties are
    broken by canary index, which membership does not depend on."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or k_plus + k_minus > len(scores):
        raise ValueError(f"{len(scores)} scores, {len(included)} memberships, {k_plus} + {k_minus} guesses")
    if not np.isfinite(scores).all():
        raise ValueError("canary scores must be finite")
    order = np.argsort(scores, kind="stable")
    high, low = order[len(order) - k_plus :] if k_plus else order[:0], order[:k_minus]
    return int(included[high].sum() + (~included[low]).sum())


@dataclass(frozen=True)
class AuditBound:
    canaries: int
    k_plus: int
    k_minus: int
    correct: int
    epsilon: float
    ceiling: float
    confidence: float

    @property
    def guesses(self) -> int:
        return self.k_plus + self.k_minus


def guess_counts(m: int) -> list[int]:
    """The symmetric k tried for m canaries (each at least 1, no repeats)."""
    return sorted({m // f for f in GUESS_FRACTIONS if m // f >= 1}, reverse=True)


def audit_bound(
    scores: Sequence[float], included: Sequence[bool], delta: float, confidence: float = CONFIDENCE
) -> AuditBound:
    """The best bound over the guess grid, each k at the Bonferroni-corrected confidence."""
    m = len(scores)
    ks = guess_counts(m)
    if not ks:
        raise ValueError("an audit needs at least 2 canaries")
    each = 1.0 - (1.0 - confidence) / len(ks)
    best: tuple[float, int, int] | None = None
    for k in ks:
        right = right_guesses(scores, included, k, k)
        bound = epsilon_lower_bound(m, 2 * k, right, delta, each)
        if best is None or bound > best[0]:
            best = (bound, k, right)
    ceiling = max(epsilon_lower_bound(m, 2 * k, 2 * k, delta, each) for k in ks)
    bound, k, right = best
    return AuditBound(m, k, k, right, bound, ceiling, confidence)
