"""The institution's privacy ledger: every DP step it ever ran, composed by Opacus into epsilon.

The file is the institution's own. It is written durably (temp file, fsync, rename) before an update
leaves the trainer, so a crash can lose an update but never the record of what it cost. A round that
would push the composed epsilon past the budget is refused before any example is touched.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedlora.common.durable import write_durably
from fedlora.common.errors import BudgetExceeded, CheckpointError

LEDGER_VERSION = 1


@dataclass(frozen=True)
class LedgerEntry:
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float
    time: float


def merged_history(entries: list[LedgerEntry]) -> list[tuple[float, float, int]]:
    """Opacus' history format, consecutive equal mechanisms merged (PRV's cost grows with entries)."""
    history: list[tuple[float, float, int]] = []
    for e in entries:
        if history and history[-1][:2] == (e.noise_multiplier, e.sample_rate):
            history[-1] = (e.noise_multiplier, e.sample_rate, history[-1][2] + e.steps)
        else:
            history.append((e.noise_multiplier, e.sample_rate, e.steps))
    return history


def compose(accountant: str, history: list[tuple[float, float, int]], delta: float) -> float:
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    with np.errstate(divide="ignore"):  # PRV takes log(1 - q): -inf at q = 1, masked out; not an error
        return float(acc.get_epsilon(delta=delta))


class PrivacyLedger:
    def __init__(self, path: str | Path, budget: float, delta: float, accountant: str) -> None:
        self.path = Path(path)
        self.budget = budget
        self.delta = delta
        self.accountant = accountant
        self.noise_multiplier: float | None = None
        self.entries: list[LedgerEntry] = []
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            entries = [LedgerEntry(**e) for e in data["entries"]]
            accountant, delta = data["accountant"], float(data["delta"])
            noise = data["noise_multiplier"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{self.path}: privacy ledger is unreadable ({type(err).__name__}: {err}); "
                "refusing to train rather than forget spent privacy"
            ) from None
        if accountant != self.accountant or delta != self.delta:
            raise CheckpointError(
                f"{self.path}: ledger was kept with accountant {accountant!r} and delta {delta}; "
                f"the config says {self.accountant!r} and {self.delta}: spend is not comparable"
            )
        self.entries, self.noise_multiplier = entries, noise

    @property
    def spent(self) -> float:
        return self.entries[-1].epsilon if self.entries else 0.0

    def history(self) -> list[tuple[float, float, int]]:
        return merged_history(self.entries)

    def projected(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        probe = LedgerEntry(0, noise_multiplier, sample_rate, steps, 0.0, 0.0)
        return compose(self.accountant, merged_history([*self.entries, probe]), self.delta)

    def calibrate(self, sample_rate: float, planned_steps: int) -> float:
        """Noise for the plan, fixed at the ledger's first round and kept for its whole life."""
        if self.noise_multiplier is None:
            with np.errstate(divide="ignore"):  # as in compose()
                self.noise_multiplier = float(
                    get_noise_multiplier(
                        target_epsilon=self.budget,
                        target_delta=self.delta,
                        sample_rate=sample_rate,
                        steps=planned_steps,
                        accountant=self.accountant,
                    )
                )
        return self.noise_multiplier

    def rounds_affordable(self, sample_rate: float, steps: int, limit: int = 10_000) -> int:
        """How many more rounds of ``steps`` fit in the budget: doubling, then bisection, since
        each probe is a full composition."""
        if self.noise_multiplier is None:
            return 0

        def fits(rounds: int) -> bool:
            return self.projected(self.noise_multiplier, sample_rate, steps * rounds) <= self.budget

        if not fits(1):
            return 0
        low, high = 1, 2
        while high <= limit and fits(high):
            low, high = high, high * 2
        high = min(high, limit + 1)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    def check(self, sample_rate: float, steps: int) -> float:
        """Epsilon after the round; raises BudgetExceeded (nothing trained) if it crosses the budget."""
        if self.noise_multiplier is None:
            raise BudgetExceeded(f"{self.path}: no noise calibrated yet; call calibrate() first")
        after = self.projected(self.noise_multiplier, sample_rate, steps)
        if after > self.budget:
            raise BudgetExceeded(
                f"privacy budget: spent epsilon {self.spent:.3f} of {self.budget:g} "
                f"({self.budget - self.spent:.3f} left, delta {self.delta:g}); this round of {steps} steps "
                f"would reach {after:.3f}; "
                f"rounds the budget still affords: {self.rounds_affordable(sample_rate, steps)}"
            )
        return after

    def commit(self, round_id: int, sample_rate: float, steps: int, epsilon: float) -> LedgerEntry:
        """Record a round that ran, durably, before its update is released."""
        if self.noise_multiplier is None:
            raise BudgetExceeded(f"{self.path}: commit before calibrate")
        entry = LedgerEntry(round_id, self.noise_multiplier, sample_rate, steps, epsilon, time.time())
        self.entries.append(entry)
        self._write()
        return entry

    def _write(self) -> None:
        data = {
            "version": LEDGER_VERSION,
            "accountant": self.accountant,
            "delta": self.delta,
            "budget": self.budget,
            "noise_multiplier": self.noise_multiplier,
            "entries": [asdict(e) for e in self.entries],
        }
        write_durably(self.path, json.dumps(data, indent=1).encode())
