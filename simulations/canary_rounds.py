"""Simulation --audit only: each virtual institution's canaries inside a federation.

The ClientApp makes a trainer per message, so an audited institution's canaries are made at its first
message and read back after, and each round's sums are added to a running file that
``fedlora.simulations.federated_audit`` scores at the end. The ClientApp sees all this through its
small seam (``fedlora.client.app.RoundObserver``), never importing this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from fedlora.client.canaries import (
    BLACK_BOX_CANARIES,
    NOISE,
    NOISE_FIELDS,
    RELEASED,
    ROWS,
    SENT,
    WHITE_BOX_CANARIES,
    CanarySpec,
    GradientCanaries,
    flatten,
    new_spec,
    with_input_canaries,
)
from fedlora.client.head_rounds import HeadRound
from fedlora.client.ledger import PrivacyLedger
from fedlora.client.noise_probe import round_noise
from fedlora.client.trainer import LocalTrainer
from fedlora.common.adapter import State
from fedlora.common.config import FedloraConfig
from fedlora.common.data import TokenizedDataset
from fedlora.common.durable import write_durably
from fedlora.common.errors import ConfigError
from fedlora.common.noise_check import NoiseSums


@dataclass(frozen=True)
class CanaryPlan:
    """A simulated institution audited inside a federation: where its canary file lives, how many."""

    path: Path
    white_box: int = WHITE_BOX_CANARIES
    black_box: int = BLACK_BOX_CANARIES


def spec_for_client(
    plan: CanaryPlan, cfg: FedloraConfig, model: nn.Module, vocab_size: int, num_labels: int
) -> CanarySpec:
    """The institution's canaries: made at its first message, then read back every round (the
    ClientApp makes a trainer per message)."""
    if plan.path.exists():
        return CanarySpec.load(plan.path)
    spec = new_spec(cfg, model, vocab_size, num_labels, plan.white_box, plan.black_box)
    plan.path.parent.mkdir(parents=True, exist_ok=True)
    spec.save(plan.path)
    return spec


def sums_file(plan: CanaryPlan) -> Path:
    return plan.path.with_suffix(".sums.safetensors")


def record_round(
    plan: CanaryPlan, spec: CanarySpec, hook: GradientCanaries, sent: State, noise: NoiseSums | None
) -> None:
    """Add a round to the institution's running sums over every round (the ClientApp makes a trainer
    per message): its privatized gradients, the rows' clipped share of them and the update it sent,
    over the canaries' space, and its noise check's sums (``noise``, under DP)."""
    measured = noise if noise is not None else NoiseSums()
    rounds = {
        RELEASED: hook.released.detach().double().cpu(),
        ROWS: hook.rows.detach().double().cpu(),
        SENT: flatten(spec, sent).double(),
        NOISE: noise_tensor(measured),
    }
    total = recorded_sums(plan)
    summed = {k: v + total[k] for k, v in rounds.items()} if total is not None else rounds
    write_durably(sums_file(plan), save_tensors(summed))


def recorded_sums(plan: CanaryPlan) -> dict[str, torch.Tensor] | None:
    """The running sums (RELEASED, ROWS, SENT, NOISE) of the institution's rounds; None before its
    first."""
    path = sums_file(plan)
    if not path.exists():
        return None
    try:
        sums = load_tensors(path.read_bytes())
    except SafetensorError as err:
        raise ConfigError(f"{path}: not a readable file of canary sums ({err})") from None
    if set(sums) != {RELEASED, ROWS, SENT, NOISE}:
        expected = sorted((RELEASED, ROWS, SENT, NOISE))
        raise ConfigError(f"{path}: expected the tensors {expected}, found {sorted(sums)}")
    return sums


def head_noise_file(canaries: Path) -> Path:
    """Where the head rounds' noise sums of the institution whose canary file is ``canaries`` live."""
    return canaries.with_suffix(".head-noise.safetensors")


def head_round_noise(released: HeadRound, clip: float, ledger: PrivacyLedger, server_round: int) -> NoiseSums:
    """The noise a head round added (its release less its exact clipped sum), against sigma x C with
    the sigma the ledger records for the round (never the release's own noise std, which is what is
    being checked)."""
    entries = [e for e in ledger.entries if e.round == server_round]
    if not entries:
        raise ValueError(f"the ledger records no round {server_round}, yet a head round released a sum")
    added = released.vector.double() - released.exact.double()
    return NoiseSums.of(float(added @ added), added.numel(), entries[-1].noise_multiplier * clip)


def head_exact_file(canaries: Path) -> Path:
    """Where the exact clipped head-gradient sums of the institution's secure head rounds live."""
    return canaries.with_suffix(".head-exact.safetensors")


def record_head_exact(path: Path, server_round: int, exact: torch.Tensor, clip: float) -> None:
    """Add a secure head round's exact clipped sum (and the clip it was made at) to the institution's
    file: its noise is a share of the sum's, so only the sum can be checked (secure_sum_audit)."""
    kept = load_tensors(path.read_bytes()) if path.exists() else {}
    kept[f"round-{server_round}"] = exact.detach().to(torch.float64).contiguous()
    kept[f"clip-{server_round}"] = torch.tensor(float(clip), dtype=torch.float64)
    write_durably(path, save_tensors(kept))


def recorded_head_exact(path: Path) -> dict[int, tuple[torch.Tensor, float]]:
    """Each secure head round's exact clipped sum and clip, by round; empty before the first."""
    if not path.exists():
        return {}
    try:
        kept = load_tensors(path.read_bytes())
        rounds = [int(k.removeprefix("round-")) for k in kept if k.startswith("round-")]
        return {r: (kept[f"round-{r}"], float(kept[f"clip-{r}"])) for r in rounds}
    except (SafetensorError, KeyError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable file of exact head-gradient sums ({err})") from None


def record_head_round(path: Path, noise: NoiseSums) -> None:
    """Add a head round's noise sums to the institution's running ones (``head_noise_file``)."""
    total = recorded_head_noise(path)
    summed = noise + total if total is not None else noise
    write_durably(path, save_tensors({NOISE: noise_tensor(summed)}))


def recorded_head_noise(path: Path) -> NoiseSums | None:
    """The head rounds' noise sums over the institution's rounds; None before its first."""
    if not path.exists():
        return None
    try:
        values = load_tensors(path.read_bytes())[NOISE]
    except (SafetensorError, KeyError) as err:
        raise ConfigError(f"{path}: not a readable file of head-round noise sums ({err})") from None
    return noise_sums(values)


def recorded_noise(sums: dict[str, torch.Tensor]) -> NoiseSums:
    """The noise check's sums over the recorded rounds."""
    return noise_sums(sums[NOISE])


def noise_tensor(noise: NoiseSums) -> torch.Tensor:
    """A NoiseSums as the tensor the sums files keep (NOISE_FIELDS in order)."""
    return torch.tensor([float(getattr(noise, f)) for f in NOISE_FIELDS], dtype=torch.float64)


def noise_sums(values: torch.Tensor) -> NoiseSums:
    """The NoiseSums of a ``noise_tensor``."""
    statistic, samples, squares, calibrated = values.tolist()
    return NoiseSums(statistic, int(samples), squares, calibrated)


@dataclass
class CanaryRound:
    """One training message of an audited virtual institution, as the ClientApp's RoundObserver:
    its canary rows added to the training rows, its gradient hook on the trainer, and the round's
    sums recorded once the update is made."""

    plan: CanaryPlan
    spec: CanarySpec | None = None
    hook: GradientCanaries | None = None

    def rows(
        self, train: TokenizedDataset, cfg: FedloraConfig, model: nn.Module, vocab_size: int, labels: int
    ) -> TokenizedDataset:
        self.spec = spec_for_client(self.plan, cfg, model, vocab_size, labels)
        return with_input_canaries(train, self.spec)

    def gradient_hook(self, trainer: LocalTrainer) -> GradientCanaries:
        assert self.spec is not None, "rows() makes the canaries first"
        self.hook = GradientCanaries(self.spec, trainer.cfg, trainer.sample_rate, trainer.expected_batch)
        return self.hook

    def sent(self, update: State, ledger: PrivacyLedger | None, server_round: int) -> None:
        if self.hook is None:
            return
        noise = round_noise(self.hook.noise, ledger, server_round) if self.hook.noise is not None else None
        record_round(self.plan, self.hook.spec, self.hook, update, noise)

    def head_sent(
        self, released: HeadRound, clip: float, ledger: PrivacyLedger | None, server_round: int
    ) -> None:
        if released.shared:  # its noise is a share: the secure sum's audit checks the sum
            record_head_exact(head_exact_file(self.plan.path), server_round, released.exact, clip)
        elif ledger is not None:  # without DP the exact sum leaves: no noise to check
            record_head_round(
                head_noise_file(self.plan.path), head_round_noise(released, clip, ledger, server_round)
            )
