"""``fedlora-simulate --audit`` of head rounds (client.head_rounds): the direct check of their noise.

A head round trains no LoRA, so no white-box canary (they live in the LoRA gradient's space) sees it,
and canaries' membership test does not apply to it: what could be tested is the head-gradient sum,
whose only secret is its noise. Inside the simulation only, the ClientApp's observer
(simulations.canary_rounds) hands over each head round's release with its exact clipped sum, which
never leaves an institution; the difference is the noise the round added, summed over the rounds
and checked here by common.noise_check against the sigma x C the institution's ledger records for
each round. An implementation that adds no noise, or less than it charges for, fails in one line.

Under secure aggregation each institution adds only a share of a head round's noise, so no release
alone can show its ledger's claim: the check is on each round's unmasked sum (handed over by the
ServerApp's ``on_secure_head``), less the exact clipped sums of the institutions in it (their
observers keep them, simulations.canary_rounds.record_head_exact), against the largest sigma x C the
ledgers claim for the round, summed over the rounds. One institution adding no share leaves
sqrt((m - 1) / m) of the claimed std; the audit states how many values catch that.
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

from fedlora.client.ledger import PrivacyLedger
from fedlora.common.config import FedloraConfig
from fedlora.common.distributed_noise import NoiseSharing
from fedlora.common.durable import write_durably
from fedlora.common.errors import FedloraError
from fedlora.common.noise_check import NoiseCheck, NoiseSums, noise_check, samples_to_detect
from fedlora.simulations.canary_rounds import (
    head_exact_file,
    head_noise_file,
    recorded_head_exact,
    recorded_head_noise,
)
from fedlora.simulations.virtual_client import canary_file, ledger_file

RESULT_FILE = "head-round-audit.json"
SECURE_RESULT_FILE = "secure-head-audit.json"
HEAD_SUM_FILE = "canaries/secure-head-sums.safetensors"


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


def head_sum_recorder(run_dir: Path) -> Callable[[int, np.ndarray], None]:
    """The ServerApp's ``on_secure_head`` in an audited simulation: each secure head round's unmasked
    sum, kept by round."""

    def record(server_round: int, total: np.ndarray) -> None:
        path = run_dir / HEAD_SUM_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = load_tensors(path.read_bytes()) if path.exists() else {}
        kept[f"round-{server_round}"] = torch.from_numpy(np.asarray(total, dtype=np.float64))
        write_durably(path, save_tensors(kept))

    return record


@dataclass(frozen=True)
class SecureHeadAudit:
    rounds: list[int]
    """The secure head rounds whose unmasked sum was checked."""
    skipped: list[str]
    """Each secure head round not checked, and why."""
    honest: int
    """m: the shares every sum is guaranteed to hold (the smallest of the checked rounds')."""
    missing_share_ratio: float
    """sqrt((m - 1) / m): the std ratio left when one of m institutions adds no share."""
    samples_to_catch_missing_share: int
    check: NoiseCheck | None


def audit_secure_head_rounds(cfg: FedloraConfig, run_dir: Path) -> SecureHeadAudit | None:
    """Check the secure head rounds' unmasked sums less the exact clipped sums against the claimed
    sigma x C; write SECURE_RESULT_FILE. None for a run without private secure head rounds."""
    fed = cfg.federation
    path = run_dir / HEAD_SUM_FILE
    if not (fed.secure_aggregation and cfg.privacy.enabled and path.exists()):
        return None
    sums = load_tensors(path.read_bytes())
    history = {int(e["round"]): e for e in json.loads((run_dir / "history.json").read_text())}
    clients = range(cfg.simulation.num_clients)
    exact = [recorded_head_exact(head_exact_file(canary_file(run_dir, pid))) for pid in clients]
    ledgers = [PrivacyLedger.from_config(cfg.privacy, ledger_file(run_dir, pid)) for pid in clients]
    total, rounds, skipped, honest = NoiseSums(), [], [], []
    for key in sorted(sums, key=lambda k: int(k.removeprefix("round-"))):
        server_round = int(key.removeprefix("round-"))
        figures = history.get(server_round, {}).get("aggregation", {})
        inputs = [e[server_round] for e in exact if server_round in e]
        if len(inputs) != int(figures.get("secagg_survivors", -1)):
            skipped.append(
                f"round {server_round}: {len(inputs)} institutions masked a head gradient, "
                f"{int(figures.get('secagg_survivors', 0))} are in the sum: the auditor cannot tell which"
            )
            continue
        sigma = max(e.noise_multiplier for led in ledgers for e in led.entries if e.round == server_round)
        noise = sums[key].numpy() - sum(v.numpy() for v, _ in inputs)
        claimed = sigma * max(clip for _, clip in inputs)
        total += NoiseSums.of(float(noise @ noise), noise.size, claimed)
        rounds.append(server_round)
        roster = int(figures["secagg_institutions"])
        honest.append(NoiseSharing(sigma, claimed, roster, fed.secagg_dropouts, fed.secagg_colluders).honest)
    m = min(honest, default=max(1, cfg.simulation.num_clients - fed.secagg_dropouts - fed.secagg_colluders))
    missing = math.sqrt((m - 1) / m)
    audit = SecureHeadAudit(
        rounds, skipped, m, missing, samples_to_detect(missing), noise_check(total) if rounds else None
    )
    write_durably(run_dir / SECURE_RESULT_FILE, json.dumps(asdict(audit), indent=1).encode())
    return audit


def require_head_noise(
    audits: list[HeadRoundAudit], where: Path, secure: SecureHeadAudit | None = None
) -> None:
    """The head rounds' verdict as an error a command exits on (one line, every failing institution,
    and the secure head sums where they carry too little noise)."""
    failed = [
        f"client-{a.client}'s head rounds carry noise of std {a.check.measured_std:.4g} = "
        f"{a.check.ratio:.3f} x the calibrated {a.check.calibrated_std:.4g} (sigma x C), p = "
        f"{a.check.p_value:.2g} < {a.check.false_alarm:g}"
        for a in audits
        if not a.check.passed
    ]
    if secure is not None and secure.check is not None and not secure.check.passed:
        n = secure.check
        failed.append(
            f"the secure head sums of rounds {', '.join(map(str, secure.rounds))} carry noise of std "
            f"{n.measured_std:.4g} = {n.ratio:.3f} x the claimed {n.calibrated_std:.4g} (sigma x C), p = "
            f"{n.p_value:.2g} < {n.false_alarm:g}: an institution added less than its share"
        )
    if failed:
        raise FedloraError(f"privacy audit: {'; '.join(failed)} ({where})")
