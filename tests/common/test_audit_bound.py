"""The one-run audit's epsilon lower bound (Steinke, Nasr and Jagielski 2023) against hand values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from fedlora.common.audit_bound import (
    audit_bound,
    epsilon_lower_bound,
    guess_counts,
    p_value,
    right_guesses,
)


def logit(q: float) -> float:
    return math.log(q / (1 - q))


@pytest.mark.parametrize("m", [10, 100, 1000])
def test_pure_dp_all_right_is_the_closed_form(m):
    """delta = 0, all m guesses right: the p-value is q^m with q = e^eps / (1 + e^eps), so the bound
    at 95% is logit(0.05^(1/m)) (by hand: m = 100 gives 3.493)."""
    assert epsilon_lower_bound(m, m, m, 0.0, 0.95) == pytest.approx(logit(0.05 ** (1 / m)), abs=1e-6)
    if m == 100:
        assert epsilon_lower_bound(m, m, m, 0.0, 0.95) == pytest.approx(3.493, abs=1e-3)


def test_p_value_is_the_binomial_tail_plus_the_delta_term():
    m, r, v, eps, delta = 200, 60, 45, 1.0, 1e-4
    q = 1 / (1 + math.exp(-eps))
    tail = stats.binom.sf(v - 1, r, q)
    assert p_value(m, r, v, eps, 0.0) == pytest.approx(tail, rel=1e-9)
    # The paper's loop: alpha = max over i of P[v > Binomial(r, q) >= v - i] / i.
    alpha = max(sum(stats.binom.pmf(v - j, r, q) for j in range(1, i + 1)) / i for i in range(1, v + 1))
    assert p_value(m, r, v, eps, delta) == pytest.approx(tail + 2 * m * delta * alpha, rel=1e-9)
    assert p_value(m, r, v, eps, delta) > p_value(m, r, v, eps, 0.0)


def test_all_right_grows_toward_its_ceiling_with_k():
    m, delta = 1000, 1e-5
    bounds = [epsilon_lower_bound(m, r, r, delta) for r in (10, 50, 100, 500, 1000)]
    assert bounds == sorted(bounds) and bounds[0] < bounds[-1]
    assert bounds[-1] <= epsilon_lower_bound(m, m, m, 0.0) + 1e-9  # delta only weakens it
    assert 5.75 < bounds[-1] < 5.809  # just below the closed form at delta = 0 (5.809)


def test_monotone_in_right_guesses_and_zero_at_chance():
    m, r = 500, 200
    bounds = [epsilon_lower_bound(m, r, v, 1e-5) for v in range(100, r + 1, 10)]
    assert all(a <= b for a, b in itertools.pairwise(bounds))
    assert bounds[0] == 0.0  # half right is chance
    assert bounds[-1] > 2


def test_right_guesses_counts_top_in_and_bottom_out():
    scores = [0.1, 0.9, 0.5, 0.2, 0.8, 0.3]
    included = [False, True, False, False, True, True]
    # top 2 (0.9, 0.8) both in; bottom 2 (0.1, 0.2) both out
    assert right_guesses(scores, included, 2, 2) == 4
    # top 3 adds 0.5 (out: wrong); bottom 3 adds 0.3 (in: wrong)
    assert right_guesses(scores, included, 3, 3) == 4
    assert right_guesses(scores, included, 0, 1) == 1
    with pytest.raises(ValueError):
        right_guesses(scores, included, 4, 3)


def test_random_guessing_gives_about_zero():
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(20):
        included = rng.random(1000) < 0.5
        bounds.append(audit_bound(rng.random(1000), included, 1e-5).epsilon)
    assert sum(b == 0.0 for b in bounds) >= 17  # at 95% confidence: 1 in 20 may exceed 0
    assert max(bounds) < 0.5


def test_perfect_scores_reach_the_ceiling_of_the_best_k():
    rng = np.random.default_rng(1)
    included = rng.random(1000) < 0.5
    result = audit_bound(included.astype(float), included, 1e-5)
    assert result.correct == result.guesses
    assert result.epsilon > 4.5
    # Bonferroni over the guess grid: each k at 1 - 0.05 / len(grid).
    each = 1 - 0.05 / len(guess_counts(1000))
    assert result.ceiling == pytest.approx(epsilon_lower_bound(1000, 1000, 1000, 1e-5, each), abs=1e-6)
    assert result.epsilon <= result.ceiling
