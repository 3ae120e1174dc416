"""The empirical privacy audit: a measured epsilon lower bound next to the ledger's claim.

An institution audits its own setup (``fedlora-client audit``): its config, its data plus canaries
(client.canaries), trained for the planned rounds exactly as ``train-local`` would, against a ledger
of the audit's own in the audit's folder; the institution's real ledger is never read or charged.
Not to be confused with client.audit, the log of outgoing messages.

A white-box bound above the claim means the implementation leaks more than it accounts for (the
bound holds at 95% confidence, so an honest implementation shows one at most 1 time in 20). Under DP
the audit also tests the noise every step actually added against the calibrated sigma x C
(common.noise_check, a chi-square test with a false alarm rate of 1e-3): far more sensitive to an
implementation that adds too little noise than any one-run epsilon bound can be.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedlora.client.canaries import (
    CanarySpec,
    GradientCanaries,
    canary_losses,
    flatten,
    input_canaries,
    new_spec,
    white_box_evidence,
    white_box_scores,
    with_input_canaries,
)
from fedlora.client.ledger import PrivacyLedger
from fedlora.client.noise_probe import round_noise
from fedlora.client.trainer import LocalTrainer, StepCallback
from fedlora.common.adapter import State, adapter_state, delta, load_adapter_state
from fedlora.common.audit_bound import CONFIDENCE, AuditBound, audit_bound
from fedlora.common.cli_support import create_folder
from fedlora.common.config import FedloraConfig
from fedlora.common.durable import write_durably
from fedlora.common.errors import ConfigError, FedloraError
from fedlora.common.model import device_for
from fedlora.common.noise_check import NoiseCheck, NoiseSums, noise_check
from fedlora.common.workbench import prepare

AUDIT_LEDGER, CANARY_FILE, RESULT_FILE = "audit-ledger.json", "canaries.json", "privacy-audit.json"
LEAK_MESSAGE = "the implementation leaks more than it accounts for"
UNDER_NOISE_MESSAGE = "the implementation adds less noise than it accounts for"


@dataclass(frozen=True)
class AuditResult:
    claimed_epsilon: float | None
    """The ledger's epsilon for the audited run; None without DP (nothing is claimed)."""
    delta: float
    white_box: AuditBound
    black_box: AuditBound | None
    noise: NoiseCheck | None = None
    """The direct test of the noise added at every DP step; None without DP."""
    seconds: float = 0.0

    @property
    def leaks(self) -> bool:
        return self.claimed_epsilon is not None and self.white_box.epsilon > self.claimed_epsilon

    @property
    def under_noised(self) -> bool:
        return self.noise is not None and not self.noise.passed

    @property
    def failed(self) -> bool:
        return self.leaks or self.under_noised

    def to_dict(self) -> dict:
        return asdict(self)


def score_canaries(
    spec: CanarySpec,
    evidence: torch.Tensor,
    losses: tuple[np.ndarray, np.ndarray] | None,
    claimed: float | None,
    dp_delta: float,
    noise: NoiseSums | None = None,
) -> AuditResult:
    """Bounds from the white-box evidence (canaries.white_box_evidence) and each input canary's loss
    before and after (black-box); the noise check from the measured ``noise`` (under DP)."""
    white = audit_bound(white_box_scores(spec, evidence), spec.white_box_included, dp_delta, CONFIDENCE)
    black = None
    if spec.black_box and losses is not None:
        before, after = losses
        black = audit_bound(before - after, spec.black_box_included, dp_delta, CONFIDENCE)
    checked = noise_check(noise) if noise is not None and noise.samples else None
    return AuditResult(claimed, dp_delta, white, black, checked)


def losses_at(model: nn.Module, state: State, spec: CanarySpec, device: torch.device) -> np.ndarray:
    """The input canaries' losses with ``model``'s adapter set to ``state``."""
    load_adapter_state(model, state)
    return canary_losses(model, spec.task, input_canaries(spec), device)


def audit_folder(out: Path) -> Path:
    """A folder for this audit alone: its ledger must count this run's steps and nothing else."""
    for name in (AUDIT_LEDGER, RESULT_FILE):
        if (out / name).exists():
            raise ConfigError(f"--out: {out / name} exists; an audit needs a new folder (its own ledger)")
    return create_folder(out, "--out")


def run_local_audit(
    cfg: FedloraConfig,
    out: Path,
    white_box: int,
    black_box: int,
    on_step: StepCallback | None = None,
) -> AuditResult:
    """Train ``cfg``'s planned rounds with canaries, against a ledger in ``out``; write the result there."""
    out = audit_folder(out)
    started = time.perf_counter()
    ledger_path = out / AUDIT_LEDGER
    # The audit's own ledger: its training sends nothing, so the institution's audit log is not its record.
    own = dataclasses.replace(cfg.privacy, ledger_path=str(ledger_path), audit_log=None)
    cfg = dataclasses.replace(cfg, privacy=own)
    bench = prepare(cfg)
    device = device_for(cfg.training.device)
    model = bench.built.model
    spec = new_spec(cfg, model, len(bench.tokenizer), len(bench.labels), white_box, black_box)
    spec.save(out / CANARY_FILE)
    train = with_input_canaries(bench.data.train, spec)
    start = adapter_state(model)
    before = losses_at(model, start, spec, device) if spec.black_box else None
    ledger = PrivacyLedger.from_config(cfg.privacy) if cfg.privacy.enabled else None
    trainer = LocalTrainer(cfg, model, train, device, ledger)
    hook = GradientCanaries(spec, trainer.cfg, trainer.sample_rate, trainer.expected_batch)
    trainer.gradient_hook = hook
    noise = NoiseSums() if ledger is not None else None
    try:
        for r in range(1, cfg.planned_rounds + 1):
            trainer.train_round(r, on_step=on_step)
            if noise is not None:
                noise += round_noise(hook.noise, ledger, r)
        final = adapter_state(trainer.model)
    finally:
        trainer.close()
    after = losses_at(model, final, spec, device) if spec.black_box else None
    claimed = ledger.spent if ledger is not None else None
    result = score_canaries(
        spec,
        white_box_evidence(cfg.privacy.enabled, hook.released, hook.rows, flatten(spec, delta(final, start))),
        (before, after) if before is not None else None,
        claimed,
        cfg.privacy.delta,
        noise,
    )
    result = dataclasses.replace(result, seconds=time.perf_counter() - started)
    write_durably(out / RESULT_FILE, json.dumps(result.to_dict(), indent=1).encode())
    return result


def require_no_leak(result: AuditResult, where: Path) -> None:
    """The audit's verdict as an error a command exits on (one line, every failed part named)."""
    found = []
    if result.under_noised:
        n = result.noise
        found.append(
            f"{UNDER_NOISE_MESSAGE}: measured noise std {n.measured_std:.4g} = {n.ratio:.3f} x the "
            f"calibrated {n.calibrated_std:.4g} (sigma x C), p = {n.p_value:.2g} < {n.false_alarm:g}"
        )
    if result.leaks:
        found.append(
            f"{LEAK_MESSAGE}: white-box lower bound epsilon {result.white_box.epsilon:.3f} > "
            f"claimed {result.claimed_epsilon:.3f} ({result.white_box.confidence:.0%} confidence)"
        )
    if found:
        raise FedloraError(f"privacy audit: {'; '.join(found)} ({where})")
