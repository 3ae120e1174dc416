"""common.accounting: mechanisms as data, composed by Opacus; every epsilon re-derived by an Opacus
accountant of the test's own (with Opacus' own RDP function, not the memo)."""

from __future__ import annotations

import pytest

from fedlora.common.accounting import (
    Accountant,
    Composition,
    GaussianRelease,
    SampledGaussian,
    merged,
)

DELTA = 1e-5



def test_events_are_opacus_history():
    assert GaussianRelease(sensitivity=2.0, noise_std=3.0).history() == ((1.5, 1.0, 1),)
    assert SampledGaussian(0.1, 1.1, 7).history() == ((1.1, 0.1, 7),)
    nested = Composition((SampledGaussian(0.1, 1.1, 3), Composition((SampledGaussian(0.1, 1.1, 4),))))
    assert nested.history() == ((1.1, 0.1, 7),)  # consecutive equal mechanisms merged
    apart = ((1.0, 0.1, 2), (1.2, 0.1, 1), (1.0, 0.1, 3))
    assert merged(apart) == apart  # only consecutive ones


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_a_composition_is_what_an_independent_opacus_accountant_says(opacus_epsilon, mechanism):
    release = GaussianRelease(sensitivity=2**0.5, noise_std=4.0 * 2**0.5)
    rounds = Composition((release, SampledGaussian(0.05, 1.1, 30), SampledGaussian(0.05, 0.9, 10)))
    mine = Accountant(mechanism, DELTA).epsilon(rounds)
    theirs = opacus_epsilon(mechanism, [(4.0, 1.0, 1), (1.1, 0.05, 30), (0.9, 0.05, 10)])
    assert mine == pytest.approx(theirs, rel=1e-9)
    # A Gaussian release of sensitivity S and std s is one step at rate 1, noise multiplier s / S.
    assert Accountant(mechanism, DELTA).epsilon(release) == pytest.approx(
        opacus_epsilon(mechanism, [(4.0, 1.0, 1)]), rel=1e-9
    )


def test_calibrated_noise_spends_the_budget_after_what_comes_first(opacus_epsilon):
    mechanism = "rdp"  # prv takes the same code path at several times the cost
    accountant = Accountant(mechanism, DELTA)
    first = GaussianRelease(sensitivity=1.0, noise_std=3.0)
    sigma = accountant.noise_multiplier(4.0, 0.05, 40, after=first)
    spent = opacus_epsilon(mechanism, [(3.0, 1.0, 1), (sigma, 0.05, 40)])
    assert 4.0 - 0.011 <= spent <= 4.0 + 1e-6
    assert accountant.noise_multiplier(4.0, 0.05, 40) < sigma  # the release costs noise
