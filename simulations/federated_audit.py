"""``fedlora-simulate --audit``: each virtual institution's privacy audit, after the federation.

Every institution inserted its canaries in its own trainer in every round (client.canaries), kept
their seed in its own file and, beside it, the sums over its rounds of the privatized gradients (what
DP-SGD releases at each step, and its epsilon covers) and of the updates it sent. The driver reads
those files and the institutions' ledgers (the claim) in the run folder (on a Ray cluster, carried
there by simulations.carry). White-box canaries are scored on the institution's own sums (the audit
of the implementation, not diluted by the others' updates, the rows' own clipped gradients taken
out), next to the direct check of the noise every step added (common.noise_check); black-box
canaries on the global adapter before and after the run (what anyone holding the final model could
measure). In deployment an institution audits itself with ``fedlora-client audit``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedlora.client.canaries import (
    RELEASED,
    ROWS,
    SENT,
    CanarySpec,
    white_box_evidence,
)
from fedlora.client.ledger import PrivacyLedger
from fedlora.client.privacy_audit import AuditResult, losses_at, score_canaries
from fedlora.common.adapter import adapter_state
from fedlora.common.config import FedloraConfig
from fedlora.common.errors import FedloraError
from fedlora.common.model import device_for
from fedlora.common.workbench import prepare
from fedlora.server.checkpoint import load_checkpoint
from fedlora.simulations.canary_rounds import CanaryPlan, recorded_noise, recorded_sums
from fedlora.simulations.virtual_client import canary_file, ledger_file

RESULT_FILE = "privacy-audit.json"


@dataclass(frozen=True)
class InstitutionAudit:
    client: int
    """The partition id (client-<id> in the run folder's ledgers/ and canaries/)."""
    result: AuditResult


def audit_federation(cfg: FedloraConfig, run_dir: Path) -> list[InstitutionAudit]:
    """Score every institution's canaries (white-box on its summed privatized gradients, black-box on
    the global adapter's change); write RESULT_FILE."""
    ckpt = load_checkpoint(run_dir / "checkpoint")
    if ckpt is None:
        raise FedloraError(f"{run_dir / 'checkpoint'}: no round completed; nothing to audit")
    bench = prepare(cfg)
    model, device = bench.built.model, device_for(cfg.training.device)
    initial = adapter_state(model)
    final = {k: ckpt.adapter[k].to(torch.float32) for k in initial}
    audits = []
    for pid in range(cfg.simulation.num_clients):
        path = canary_file(run_dir, pid)
        if not path.exists():
            continue  # never trained (not sampled, or failed before its first step)
        spec = CanarySpec.load(path)
        sums = recorded_sums(CanaryPlan(path))
        if sums is None:
            continue  # its canaries were made, but no step ran
        losses = None
        if spec.black_box:
            losses = (losses_at(model, initial, spec, device), losses_at(model, final, spec, device))
        claimed = None
        if cfg.privacy.enabled:
            claimed = PrivacyLedger.from_config(cfg.privacy, ledger_file(run_dir, pid)).spent
        evidence = white_box_evidence(cfg.privacy.enabled, sums[RELEASED], sums[ROWS], sums[SENT])
        noise = recorded_noise(sums) if cfg.privacy.enabled else None
        result = score_canaries(spec, evidence, losses, claimed, cfg.privacy.delta, noise)
        audits.append(InstitutionAudit(pid, result))
    (run_dir / RESULT_FILE).write_text(json.dumps([asdict(a) for a in audits], indent=1))
    return audits
