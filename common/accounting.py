"""Privacy accounting that the institution and the coordinator share: mechanisms as data, composed by
Opacus into epsilon.

In the spirit of dp_accounting's events: a mechanism is a value (``GaussianRelease``,
``SampledGaussian``, ``Composition``), and an ``Accountant`` (one of Opacus' accountants by the
name ``privacy.accountant`` gives it, and a delta) says what a mechanism costs. Nothing here
computes an epsilon itself: each event becomes Opacus' history, ``(noise multiplier, sample rate,
steps)`` entries, and Opacus' accountant composes it. A Gaussian release of L2 sensitivity S with
noise std s is exactly one sampled Gaussian step at sample rate 1 and noise multiplier s / S.

The answers are pure functions of their inputs and cached per process (``composed``,
``calibrate_noise``): virtual institutions with the same history share one PRV composition, and one
step's RDP curve is remembered per mechanism (common.rdp_memo).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

from fedlora.common.errors import ConfigError
from fedlora.common.rdp_memo import memoize_opacus_rdp

# How close below the budget a calibration lands (Opacus' get_noise_multiplier uses the same).
EPSILON_TOLERANCE = 0.01

# Opacus' history: (noise multiplier, sample rate, steps) per mechanism, in order.
History = tuple[tuple[float, float, int], ...]


@dataclass(frozen=True)
class GaussianRelease:
    """One release of a value of L2 sensitivity ``sensitivity`` with Gaussian noise of std ``noise_std``."""

    sensitivity: float
    noise_std: float

    def history(self) -> History:
        return ((self.noise_std / self.sensitivity, 1.0, 1),)


@dataclass(frozen=True)
class SampledGaussian:
    """``steps`` DP-SGD steps: Poisson sampling at ``sample_rate``, noise std ``noise_multiplier`` x C."""

    sample_rate: float
    noise_multiplier: float
    steps: int = 1

    def history(self) -> History:
        return ((self.noise_multiplier, self.sample_rate, self.steps),)


@dataclass(frozen=True)
class Composition:
    """The events one after the other, on the same data."""

    events: tuple[Event, ...]

    def history(self) -> History:
        return merged(h for event in self.events for h in event.history())


Event = GaussianRelease | SampledGaussian | Composition


def merged(history: Iterable[tuple[float, float, int]]) -> History:
    """Consecutive equal mechanisms merged into one entry of their steps: PRV's cost grows with entries."""
    out: list[tuple[float, float, int]] = []
    for noise, rate, steps in history:
        if out and out[-1][:2] == (noise, rate):
            out[-1] = (noise, rate, out[-1][2] + steps)
        else:
            out.append((noise, rate, steps))
    return tuple(out)


@dataclass(frozen=True)
class Accountant:
    """Opacus' accountant ``mechanism`` (privacy.accountant: rdp or prv) at ``delta``."""

    mechanism: str
    delta: float

    def epsilon(self, event: Event) -> float:
        """What ``event`` spends, composed by Opacus."""
        return compose(self.mechanism, event.history(), self.delta)

    def noise_multiplier(
        self, budget: float, sample_rate: float, steps: int, after: Event | None = None
    ) -> float:
        """The noise at which ``steps`` steps at ``sample_rate``, after ``after``, spend ``budget``."""
        also = after.history() if after is not None else ()
        return calibrate_noise(budget, self.delta, self.mechanism, sample_rate, steps, also)


@contextmanager
def _opacus_quietly() -> Iterator[None]:
    """PRV takes log(1 - q): -inf at q = 1, masked out; at huge noise exp() overflows, also masked.
    RDP notes when its best order is at the end of its range: its epsilon then errs high, which is safe.
    One step's RDP is remembered per mechanism (common.rdp_memo): the same answers, computed once."""
    memoize_opacus_rdp()
    with np.errstate(divide="ignore", over="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        yield


def compose(accountant: str, history: Iterable[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of ``history``; mechanisms of no steps spend nothing (PRV divides by their count)."""
    spending = tuple(h for h in history if h[2] > 0)
    return composed(accountant, spending, delta) if spending else 0.0


@lru_cache(maxsize=1024)
def composed(accountant: str, history: History, delta: float) -> float:
    """Epsilon of ``history``: a pure function of these inputs, so cached per process. A reservation
    composes the ledger's merged history plus the new round; institutions of one simulation with the
    same sample rate share those histories, and one PRV composition costs a tenth of a second or more
    (README, "A thousand institutions"). Each ledger still records every entry and re-derives its epsilon."""
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    with _opacus_quietly():
        return float(acc.get_epsilon(delta=delta))


def _too_little_budget(
    budget: float, delta: float, accountant: str, sample_rate: float, steps: int, also: History
) -> ConfigError:
    floor = compose(accountant, [*also, (MAX_SIGMA, sample_rate, steps)], delta)
    head = f" after the {len(also)} release(s) planned before them" if also else ""
    return ConfigError(
        f"privacy.epsilon: {budget:g} is below what any noise can reach over the planned "
        f"{steps} steps at sample rate {sample_rate:.4g}{head} (delta {delta:g}); "
        f"the {accountant} accountant needs privacy.epsilon of at least about {floor:.3g}"
    )


@lru_cache(maxsize=1024)
def calibrate_noise(
    budget: float,
    delta: float,
    accountant: str,
    sample_rate: float,
    steps: int,
    also: History = (),
) -> float:
    """The noise multiplier at which ``steps`` DP-SGD steps at ``sample_rate``, composed after the
    mechanisms ``also`` (Opacus history entries, e.g. the statistics release), spend ``budget``. Pure, so
    cached: the planner and the ledger ask the same question once per process."""
    if not also:
        try:
            with _opacus_quietly():
                return float(
                    get_noise_multiplier(
                        target_epsilon=budget,
                        target_delta=delta,
                        sample_rate=sample_rate,
                        steps=steps,
                        accountant=accountant,
                    )
                )
        except ValueError as err:
            if "too low" not in str(err):
                raise
            raise _too_little_budget(budget, delta, accountant, sample_rate, steps, also) from None

    def spent(sigma: float) -> float:
        return compose(accountant, [*also, (sigma, sample_rate, steps)], delta)

    if compose(accountant, list(also), delta) >= budget:
        raise _too_little_budget(budget, delta, accountant, sample_rate, steps, also)
    # The steps alone at the whole budget need less noise than after ``also``: a bracket's low end.
    low = calibrate_noise(budget, delta, accountant, sample_rate, steps)
    high = 1.25 * low
    while spent(high) > budget:
        low, high = high, 2 * high
        if high > MAX_SIGMA:
            raise _too_little_budget(budget, delta, accountant, sample_rate, steps, also)
    while high - low > 1e-6:
        sigma = (low + high) / 2
        eps = spent(sigma)
        if eps > budget:
            low = sigma
        elif eps < budget - EPSILON_TOLERANCE:
            high = sigma
        else:
            return sigma
    return high
