"""The institution's privacy ledger: every DP step it ever ran, composed by Opacus into epsilon.

The file is the institution's own, and several processes may spend from it at once (``train-local``,
a SuperNode's ClientApp, a simulation). A round's spend is therefore reserved before any of its
steps runs: under an exclusive lock on a sidecar file, the ledger is re-read from disk, the round is
composed with everything on disk, refused if it would cross the budget, and appended durably (temp
file, fsync, rename) before the lock is released. Spend is on disk before anything trains or leaves;
a crash can cost a round's budget but never lose its record, and no two processes can overspend.

A ledger that is lost (deleted, cleared, its steps lowered, an older backup, a relative path that
moved) would reset the budget. Each reservation therefore first checks the file against itself (its
entries must compose to every epsilon it recorded) and against the institution's audit log
(client.audit.released: every training reply that left, with its round, steps and epsilon): a ledger
that covers less than was provably sent is refused, never silently restarted.

A federation resumed after a crash sends again, with the same absolute round number, the round it
was in. A reservation the ClientApp made for that round (``federated``) whose update never left (no
training reply of that round in the audit log) released nothing: the round re-run uses it instead of
charging the round twice. An update that did leave is charged again.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedlora.client.audit import Released, released
from fedlora.common.accounting import Accountant, Composition, SampledGaussian, calibrate_noise
from fedlora.common.config import PrivacyConfig
from fedlora.common.distributed_noise import NoiseSharing
from fedlora.common.durable import write_durably
from fedlora.common.errors import BudgetExceeded, CheckpointError, ConfigError

log = logging.getLogger("fedlora.client")
LEDGER_VERSION = 1
# The ledger entry of the round-0 statistics release (client.statistics), before round 1 of the
# institution: one Gaussian mechanism of L2 sensitivity S and noise std sigma * S is exactly one
# DP-SGD step at sample rate 1 and noise multiplier sigma, so Opacus composes it with the rounds.
STATISTICS_ROUND = 0
# The ledger's privacy unit when data.privacy_unit is unset (and in ledgers written before it existed).
ROW_UNIT = "row"
# Slack when comparing a ledger's composed epsilon with epsilons it or the audit log recorded: the
# same composition gives the same float, so this only absorbs a JSON round trip.
RECORDED_SLACK = 1e-9


@dataclass(frozen=True)
class LedgerEntry:
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float
    time: float
    federated: bool = False
    """Reserved by the ClientApp for the federation's round ``round`` (see reserve's ``federated``)."""
    share_noise_multiplier: float | None = None
    """Distributed noise (common.distributed_noise): the institution's own share, sigma / sqrt(m); the
    entry's ``noise_multiplier`` is then the sum's, sigma."""
    epsilon_alone: float | None = None
    """Once any entry shared its noise: the epsilon after this entry without the aggregation
    assumption (each shared entry at its share alone)."""

    def event(self, alone: bool = False) -> SampledGaussian:
        """The entry as a mechanism for common.accounting; ``alone``: at its own share, if it has one."""
        shared = alone and self.share_noise_multiplier is not None
        noise = self.share_noise_multiplier if shared else self.noise_multiplier
        return SampledGaussian(self.sample_rate, noise, self.steps)


def merged_history(entries: list[LedgerEntry]) -> list[tuple[float, float, int]]:
    """Opacus' history of the entries, consecutive equal mechanisms merged (common.accounting.merged)."""
    return list(Composition(tuple(e.event() for e in entries)).history())


def require_meaningful_delta(delta: float, rows: int, unit: str = "rows") -> None:
    """delta >= 1/rows allows releasing a whole row outright (1/persons: a whole person's rows): no
    privacy worth the name."""
    if rows > 0 and delta >= 1 / rows:
        what = "record" if unit == "rows" else "person's records"
        raise ConfigError(
            f"privacy.delta: {delta:g} is not below 1/{unit} = 1/{rows} = {1 / rows:.3g}; "
            f"a delta that large permits leaking a whole {what} (use well below 1/{unit}, e.g. 1e-5)"
        )


def _is_number(value: object, integer: bool = False) -> bool:
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)


# Entry fields a ledger may leave out (written only when set): older ledgers have none of them.
OPTIONAL_FIELDS = ("federated", "share_noise_multiplier", "epsilon_alone")


def _set(value: object) -> bool:
    """An optional entry field worth writing: not None, not False (0.0 is written)."""
    return value is not None and value is not False


def _entry(raw: object) -> LedgerEntry:
    names = [f.name for f in fields(LedgerEntry) if f.name not in OPTIONAL_FIELDS]
    if not isinstance(raw, dict) or sorted(set(raw) - set(OPTIONAL_FIELDS)) != sorted(names):
        raise ValueError(
            f"an entry must have exactly the fields {names} (and optionally {list(OPTIONAL_FIELDS)}), "
            f"got {raw!r}"
        )
    if not isinstance(raw.get("federated", False), bool):
        raise ValueError(f"entry field 'federated' is {raw['federated']!r}, expected true or false")
    share, alone = raw.get("share_noise_multiplier"), raw.get("epsilon_alone")
    if share is not None and not (_is_number(share) and share > 0 and _is_number(alone)):
        raise ValueError(
            f"entry field 'share_noise_multiplier' is {share!r} with 'epsilon_alone' {alone!r}, expected "
            "a positive number with a finite epsilon"
        )
    if alone is not None and not (_is_number(alone) and alone >= 0):
        raise ValueError(f"entry field 'epsilon_alone' is {alone!r}, expected a finite number >= 0")
    integers = {"round", "steps"}
    bad = [n for n in names if not _is_number(raw[n], integer=n in integers)]
    if bad:
        raise ValueError(f"entry field {bad[0]!r} is {raw[bad[0]]!r}, expected a finite number")
    if raw["noise_multiplier"] <= 0 or not 0 < raw["sample_rate"] <= 1 or raw["steps"] < 0:
        raise ValueError(f"entry out of range: {raw!r}")
    return LedgerEntry(**raw)


class PrivacyLedger:
    def __init__(
        self,
        path: str | Path,
        budget: float,
        delta: float,
        accountant: str,
        audit_log: str | Path | None = None,
    ) -> None:
        if not _is_number(budget) or budget <= 0:
            raise ConfigError(f"privacy.epsilon: {budget!r}; expected a finite budget above 0")
        if not _is_number(delta) or not 0 < delta < 1:
            raise ConfigError(f"privacy.delta: {delta!r}; expected a number between 0 and 1")
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.budget = budget
        self.delta = delta
        self.accountant = accountant
        self.accounting = Accountant(accountant, delta)
        # The institution's audit log (privacy.audit_log): what left, which this ledger must cover.
        self.audit_log = Path(audit_log) if audit_log else None
        # What one epsilon protects, "row" or the data.privacy_unit column (a person): as the file
        # records it, and as this process spends (require_unit; None: not declared, the file's kept).
        self.recorded_unit = ROW_UNIT
        self.unit: str | None = None
        self.noise_multiplier: float | None = None
        self.entries: list[LedgerEntry] = []
        self.refresh()

    @classmethod
    def from_config(
        cls, privacy: PrivacyConfig, path: str | Path | None = None, audit_log: str | Path | None = None
    ) -> PrivacyLedger:
        """The ledger at ``privacy.ledger_path``, or at ``path`` (a virtual institution's, a benchmark's),
        checked against the audit log at ``audit_log``, else ``privacy.audit_log``."""
        return cls(
            path or privacy.ledger_path,
            privacy.epsilon,
            privacy.delta,
            privacy.accountant,
            audit_log or privacy.audit_log,
        )

    def refresh(self) -> None:
        """Adopt what is on disk. Writes are atomic renames, so reading needs no lock; a noise
        calibrated here but not yet recorded is kept until the file has one."""
        if not self.path.exists():
            self.entries = []
            return
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            accountant, delta, noise, raw = (
                data["accountant"],
                data["delta"],
                data["noise_multiplier"],
                data["entries"],
            )
            if not isinstance(raw, list):
                raise ValueError(f"'entries' is {type(raw).__name__}, expected a list")
            entries = [_entry(e) for e in raw]
            if not (noise is None and not entries) and not (_is_number(noise) and noise > 0):
                raise ValueError(f"'noise_multiplier' is {noise!r}, expected a positive number")
            if not _is_number(delta):
                raise ValueError(f"'delta' is {delta!r}, expected a number")
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
        self.entries = entries
        if noise is not None:
            self.noise_multiplier = noise
        self.recorded_unit = data.get("privacy_unit", ROW_UNIT)

    @property
    def spent(self) -> float:
        return self.entries[-1].epsilon if self.entries else 0.0

    def history(self) -> list[tuple[float, float, int]]:
        return merged_history(self.entries)

    def projected(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        also: tuple[tuple[float, float, int], ...] = (),
    ) -> float:
        """Epsilon after what is on disk, the mechanisms ``also`` (a planned statistics release), then
        these steps."""
        planned = [SampledGaussian(q, z, n) for z, q, n in (*also, (noise_multiplier, sample_rate, steps))]
        return self.accounting.epsilon(self.composition(*planned))

    def composition(self, *planned: SampledGaussian, alone: bool = False) -> Composition:
        """The entries on disk, then ``planned``, as one event; ``alone``: without the aggregation
        assumption (entries of distributed noise at their own share)."""
        return Composition((*(e.event(alone) for e in self.entries), *planned))

    @property
    def spent_alone(self) -> float | None:
        """Epsilon without the aggregation assumption, once an entry shared its noise; else None."""
        return self.entries[-1].epsilon_alone if self.entries else None

    def calibrate(
        self, sample_rate: float, planned_steps: int, also: tuple[tuple[float, float, int], ...] = ()
    ) -> float:
        """Noise for the plan, fixed at the ledger's first round and kept for its whole life; the
        mechanisms ``also`` (the statistics release) are composed first, so that they and every planned
        step together spend the budget."""
        if self.noise_multiplier is None:
            self.noise_multiplier = calibrate_noise(
                self.budget, self.delta, self.accountant, sample_rate, planned_steps, also
            )
        return self.noise_multiplier

    def require_unit(self, unit: str | None) -> None:
        """A ledger composes one privacy unit's spend: rows spent per row protect a person only by
        group privacy, so a ledger kept per row cannot go on per person (or the reverse)."""
        self.unit = ROW_UNIT if unit is None else unit
        self._same_unit()

    def _same_unit(self) -> None:
        if not self.entries or self.unit is None or self.recorded_unit == self.unit:
            return

        def name(u: str) -> str:
            return "row" if u == ROW_UNIT else f"person (column '{u}')"

        raise CheckpointError(
            f"{self.path}: ledger was kept with privacy unit {name(self.recorded_unit)}, the config's is "
            f"{name(self.unit)} (data.privacy_unit): its epsilons are not comparable; use a new "
            "privacy.ledger_path"
        )

    def require_covers(self, sent: Released) -> None:
        """Refuse (CheckpointError, one line) a ledger that accounts for less than it recorded itself or
        than the audit log proves has left: its epsilon would restart below what was spent."""
        now = self.accounting.epsilon(self.composition())
        recorded = max((e.epsilon for e in self.entries), default=0.0)
        recover = (
            f"restore {self.path} from its backup or point privacy.ledger_path back at the ledger that "
            "recorded these rounds; a budget is never restarted"
        )
        alone = [e.epsilon_alone for e in self.entries if e.epsilon_alone is not None]
        checks = [(now, recorded, "")]
        if alone:
            now_alone = self.accounting.epsilon(self.composition(alone=True))
            checks.append((now_alone, max(alone), " without the aggregation assumption"))
        for composes, kept, assumption in checks:
            if composes < kept - RECORDED_SLACK:
                raise CheckpointError(
                    f"{self.path}: the ledger's entries compose to epsilon {composes:.3f}{assumption} but "
                    f"it recorded {kept:.3f}: entries were removed or steps lowered; refusing to train: "
                    f"{recover}"
                )
        short = sorted(r for r, steps in sent.steps.items() if self._steps_of(r) < steps)
        if sent.epsilon > now + RECORDED_SLACK or short:
            rounds = ", ".join(map(str, short[:5])) + (" ..." if len(short) > 5 else "")
            what = f"; updates of rounds {rounds} left without their steps in the ledger" if short else ""
            raise CheckpointError(
                f"{self.path}: the ledger accounts for epsilon {now:.3f} but the audit log {sent.path} "
                f"records epsilon {sent.epsilon:.3f} already reported{what}; refusing to train: {recover}"
            )

    def _steps_of(self, round_id: int) -> int:
        return sum(e.steps for e in self.entries if e.round == round_id)

    def rounds_affordable(
        self,
        sample_rate: float,
        steps: int,
        limit: int = 10_000,
        also: tuple[tuple[float, float, int], ...] = (),
    ) -> int:
        """How many more rounds of ``steps`` fit in the budget after ``also`` (a planned statistics release):
        doubling, then bisection, since each probe is a full composition."""
        if self.noise_multiplier is None:
            return 0

        def fits(rounds: int) -> bool:
            return self.projected(self.noise_multiplier, sample_rate, steps * rounds, also) <= self.budget

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

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def reserve(
        self,
        round_id: int,
        sample_rate: float,
        steps: int,
        noise_multiplier: float | None = None,
        federated: bool = False,
        sharing: NoiseSharing | None = None,
    ) -> LedgerEntry:
        """Charge a round before it runs: under the lock, against what is on disk now. Raises
        BudgetExceeded, writing nothing, if the round would cross the budget. The entry carries
        the noise the round must use: the file's, once any process has recorded one; a mechanism
        of its own noise (the statistics release) passes ``noise_multiplier``. ``federated``: the
        ClientApp's reservation for the federation's round ``round_id``, which a resumed federation
        re-running that round reuses while its update has not left (``unreleased``). ``sharing``:
        distributed noise; the entry is charged at the sum's noise (the aggregation assumption: its
        ``sigma`` is the noise) and records its share and the epsilon without the assumption."""
        with self._locked():
            self.refresh()
            self._same_unit()
            sent = released(self.audit_log)
            self.require_covers(sent)
            if self.noise_multiplier is None:
                raise BudgetExceeded(f"{self.path}: no noise calibrated yet; call calibrate() first")
            noise = self.noise_multiplier if noise_multiplier is None else noise_multiplier
            share = None
            if sharing is not None:
                noise, share = sharing.sigma, sharing.share_multiplier
            if federated and (kept := self.unreleased(round_id, (noise, sample_rate, steps, share), sent)):
                return kept
            after = self.projected(noise, sample_rate, steps)
            if after > self.budget:
                raise BudgetExceeded(
                    f"privacy budget: spent epsilon {self.spent:.3f} of {self.budget:g} "
                    f"({self.budget - self.spent:.3f} left, delta {self.delta:g}); this round of {steps} "
                    f"steps would reach {after:.3f}; "
                    f"rounds the budget still affords: {self.rounds_affordable(sample_rate, steps)}"
                )
            alone = None
            if share is not None or self.spent_alone is not None:
                planned = SampledGaussian(sample_rate, noise if share is None else share, steps)
                alone = self.accounting.epsilon(self.composition(planned, alone=True))
            entry = LedgerEntry(
                round_id, noise, sample_rate, steps, after, time.time(), federated, share, alone
            )
            self._write([*self.entries, entry])
            self.entries.append(entry)
        return entry

    def unreleased(
        self, round_id: int, mechanism: tuple[float, float, int, float | None], sent: Released
    ) -> LedgerEntry | None:
        """The ClientApp's reservation of the same mechanism (noise, sample rate, steps, share) for
        round ``round_id``, when it is the ledger's last entry and the audit log (which records a
        reply before it leaves) has no update of that round: a crash ended that round before anything
        left, so its noise was never released and running the round now spends what was reserved.
        None otherwise (charge)."""
        last = self.entries[-1] if self.entries else None
        if (
            sent.path is None
            or last is None
            or not last.federated
            or last.round != round_id
            or (last.noise_multiplier, last.sample_rate, last.steps, last.share_noise_multiplier) != mechanism
            or round_id in sent.steps
        ):
            return None
        log.info("round %d: reservation in %s reused: its update never left", round_id, self.path)
        return last

    def _write(self, entries: list[LedgerEntry]) -> None:
        data = {
            "version": LEDGER_VERSION,
            "accountant": self.accountant,
            "delta": self.delta,
            "budget": self.budget,
            "noise_multiplier": self.noise_multiplier,
            "privacy_unit": self.unit or self.recorded_unit,
            "entries": [
                {k: v for k, v in asdict(e).items() if k not in OPTIONAL_FIELDS or _set(v)}
                for e in entries
            ],
        }
        write_durably(self.path, json.dumps(data, indent=1).encode())
