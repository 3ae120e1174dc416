"""``fedlora-simulate --audit`` under secure aggregation: the noise of round 0's unmasked sum.

Each institution adds only a share of the noise (common.distributed_noise), so no release alone can
show what its ledger claims: that the SUM carries noise of std sigma C. The coordinator learns that
sum (handed over by the ServerApp's ``on_secure_sum``); a simulation's auditor also knows, by
construction only, what went into it: every partition's exact class statistics, recomputed here on
the frozen base (round 0's global adapter changes no embedding). The unmasked sum less the exact sum
is the noise the institutions added together, and every coordinate of it is checked by
common.noise_check against the largest sigma C the institutions' ledgers claim (each claim must hold).

One institution adding no share leaves sqrt((m - 1) / m) of the claimed std (m: institutions every sum
is guaranteed to hold); the audit states how many coordinates catch that (noise_check's power) beside
how many the run's sum had. Where an institution is missing from the sum, the auditor cannot tell which
partitions it holds, and says so instead of checking.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedlora.client.ledger import STATISTICS_ROUND, PrivacyLedger
from fedlora.client.statistics import class_sums, head_rows
from fedlora.common.config import FedloraConfig
from fedlora.common.distributed_noise import NoiseSharing
from fedlora.common.durable import write_durably
from fedlora.common.errors import FedloraError
from fedlora.common.model import device_for
from fedlora.common.noise_check import NoiseCheck, NoiseSums, noise_check, samples_to_detect
from fedlora.common.protocol import STATISTICS_SENSITIVITY
from fedlora.common.workbench import prepare
from fedlora.simulations.partitions import simulation_partitions
from fedlora.simulations.virtual_client import ledger_file

SUM_FILE = "canaries/secure-sum.safetensors"
RESULT_FILE = "secure-sum-audit.json"
SUM = "sum"


def sum_recorder(run_dir: Path) -> Callable[[np.ndarray], None]:
    """The ServerApp's ``on_secure_sum`` in an audited simulation: round 0's unmasked sum, kept."""

    def record(total: np.ndarray) -> None:
        path = run_dir / SUM_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(path, save_tensors({SUM: torch.from_numpy(np.asarray(total, dtype=np.float64))}))

    return record


def sum_noise(total: np.ndarray, exact: np.ndarray, claimed_std: float) -> NoiseSums:
    """The noise of an unmasked sum whose inputs are known (``exact``), for the check against the
    claimed std (sigma C); additive over rounds."""
    noise = np.asarray(total, dtype=np.float64) - np.asarray(exact, dtype=np.float64)
    return NoiseSums.of(float(noise @ noise), noise.size, claimed_std)


def exact_sum(cfg: FedloraConfig) -> np.ndarray:
    """Every virtual institution's exact class statistics, summed and flattened as the secure sum is
    (class sums row by row, then the counts)."""
    bench, device = prepare(cfg), device_for(cfg.training.device)
    model = bench.built.model.to(device)
    classes = head_rows(model)
    parts = [
        class_sums(model, bench.data.train.subset(rows), classes, device, cfg.training.eval_batch_size)
        for rows in simulation_partitions(cfg)[0]
    ]
    sums, counts = sum(s for s, _ in parts), sum(c for _, c in parts)
    return torch.cat([sums.flatten(), counts]).numpy()


@dataclass(frozen=True)
class SumAudit:
    institutions: int
    """Institutions that advertised keys (the round's roster)."""
    survivors: int
    """Institutions whose masked statistics are in the sum."""
    honest: int
    """m: the shares every sum is guaranteed to hold (roster - tolerated dropouts - colluders)."""
    claimed_sigma: float | None
    """The largest noise multiplier the institutions' ledgers claim for round 0 (None: none does)."""
    missing_share_ratio: float
    """sqrt((m - 1) / m): the std ratio left when one of m institutions adds no share."""
    samples_to_catch_missing_share: int
    """Coordinates (summed over rounds) the check needs to catch that ratio (noise_check's power)."""
    check: NoiseCheck | None
    """None where the sum was not checked (``skipped`` says why)."""
    skipped: str | None = None

    @property
    def under_noised(self) -> bool:
        return self.check is not None and not self.check.passed


def claimed_sigma(cfg: FedloraConfig, run_dir: Path) -> float | None:
    """The largest round-0 noise multiplier any institution's ledger records; None if none does."""
    found = []
    for pid in range(cfg.simulation.num_clients):
        path = ledger_file(run_dir, pid)
        if path.exists():
            entries = PrivacyLedger.from_config(cfg.privacy, path).entries
            found += [e.noise_multiplier for e in entries if e.round == STATISTICS_ROUND]
    return max(found, default=None)


def audit_secure_sum(cfg: FedloraConfig, run_dir: Path) -> SumAudit | None:
    """Check round 0's unmasked sum's noise against the claimed sigma C; write RESULT_FILE. None for a
    run without a private round 0 under secure aggregation."""
    fed = cfg.federation
    if not (fed.secure_aggregation and cfg.privacy.enabled):
        return None
    history = json.loads((run_dir / "history.json").read_text())
    first = next((e for e in history if e.get("round") == 0), None)
    if first is None:
        return None
    roster = int(first.get("aggregation", {}).get("secagg_institutions", cfg.simulation.num_clients))
    survivors = int(first.get("aggregation", {}).get("secagg_survivors", 0))
    sigma = claimed_sigma(cfg, run_dir)
    tolerated = (fed.secagg_dropouts, fed.secagg_colluders)
    honest = NoiseSharing(sigma or 0.0, STATISTICS_SENSITIVITY, roster, *tolerated).honest
    missing = math.sqrt((honest - 1) / honest)
    skipped, check = None, None
    if sigma is None:
        skipped = "no institution's ledger records a round-0 release"
    elif not (run_dir / SUM_FILE).exists():
        skipped = "round 0 was discarded: nothing was unmasked"
    elif survivors != cfg.simulation.num_clients:
        skipped = (
            f"{survivors} of {cfg.simulation.num_clients} institutions are in the sum: the auditor cannot "
            "tell which partitions it holds"
        )
    else:
        total = load_tensors((run_dir / SUM_FILE).read_bytes())[SUM].numpy()
        check = noise_check(sum_noise(total, exact_sum(cfg), sigma * STATISTICS_SENSITIVITY))
    audit = SumAudit(
        institutions=roster,
        survivors=survivors,
        honest=honest,
        claimed_sigma=sigma,
        missing_share_ratio=missing,
        samples_to_catch_missing_share=samples_to_detect(missing),
        check=check,
        skipped=skipped,
    )
    write_durably(run_dir / RESULT_FILE, json.dumps(asdict(audit), indent=1).encode())
    return audit


def require_enough_noise(audit: SumAudit | None, where: Path) -> None:
    """The sum's verdict as an error a command exits on (one line)."""
    if audit is not None and audit.under_noised:
        n = audit.check
        raise FedloraError(
            f"privacy audit: round 0's securely summed statistics carry noise of std {n.measured_std:.4g} = "
            f"{n.ratio:.3f} x the claimed {n.calibrated_std:.4g} (sigma x C), p = {n.p_value:.2g} < "
            f"{n.false_alarm:g}: an institution added less than its share ({where})"
        )
