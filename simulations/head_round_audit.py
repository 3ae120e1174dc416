"""``fedlora-simulate --audit`` of head rounds (client.head_rounds): the direct check of their noise.

A head round trains no LoRA, so no white-box canary (they live in the LoRA gradient's space) sees it,
and canaries' membership test does not apply to it: what could be tested is the head-gradient sum,
whose only secret is its noise. Inside the simulation only, the ClientApp's observer
(simulations.canary_rounds) hands over each head round's release with its exact clipped sum, which
never leaves an institution; the difference is the noise the round added, summed over the rounds
and checked here by common.noise_check against the sigma x C the institution's ledger records for
each round. An implementation that adds no noise, or less than it charges for, fails in one line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fedlora.common.config import FedloraConfig
from fedlora.common.durable import write_durably
from fedlora.common.errors import FedloraError
from fedlora.common.noise_check import NoiseCheck, noise_check
from fedlora.simulations.canary_rounds import head_noise_file, recorded_head_noise
from fedlora.simulations.virtual_client import canary_file

RESULT_FILE = "head-round-audit.json"


@dataclass(frozen=True)
class HeadRoundAudit:
    client: int
    """The partition id (client-<id> in the run folder's ledgers/ and canaries/)."""
    check: NoiseCheck
    """The noise of every head round it answered, against its ledger's sigma x C."""


def audit_head_rounds(cfg: FedloraConfig, run_dir: Path) -> list[HeadRoundAudit]:
    """Check each institution's head-round noise (those that ran one under DP); write RESULT_FILE
    when any did."""
    audits = []
    for pid in range(cfg.simulation.num_clients):
        noise = recorded_head_noise(head_noise_file(canary_file(run_dir, pid)))
        if noise is not None and noise.samples:
            audits.append(HeadRoundAudit(pid, noise_check(noise)))
    if audits:
        write_durably(run_dir / RESULT_FILE, json.dumps([asdict(a) for a in audits], indent=1).encode())
    return audits


def require_head_noise(audits: list[HeadRoundAudit], where: Path) -> None:
    """The head rounds' verdict as an error a command exits on (one line, every failing institution)."""
    failed = [
        f"client-{a.client}'s head rounds carry noise of std {a.check.measured_std:.4g} = "
        f"{a.check.ratio:.3f} x the calibrated {a.check.calibrated_std:.4g} (sigma x C), p = "
        f"{a.check.p_value:.2g} < {a.check.false_alarm:g}"
        for a in audits
        if not a.check.passed
    ]
    if failed:
        raise FedloraError(f"privacy audit: {'; '.join(failed)} ({where})")
