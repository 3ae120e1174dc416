"""A head round: one noisy, clipped gradient sum of the classification head over all this
institution's rows (client.recipe plans it; common.head_gradient says what the vector is).

The LoRA adapter is not trained: the head sees the model's pooled features, and the per-example
gradients of the cross-entropy with respect to the head alone come from Opacus' GradSampleModule;
Opacus' DPOptimizer clips each to the norm C and sums them (its own rule, so nothing here clips
differently from DP-SGD), and the Gaussian noise of std sigma C is drawn as the statistics release
draws its own (client.statistics.noisy). At sample rate 1 this is one DP-SGD step, which the ledger
charges before a row is read. No row count leaves: the server divides by round 0's released counts.
Under secure aggregation (client.app, the head round's stages) the institution adds only its share of
the round's agreed noise (common.distributed_noise: std sigma C / sqrt(m)), and the ledger records the
round at the sum's sigma and at the share alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn

from fedlora.client.ledger import LedgerEntry, PrivacyLedger
from fedlora.client.statistics import noisy, pooled_features
from fedlora.common.adapter import peft_state
from fedlora.common.data import TokenizedDataset
from fedlora.common.distributed_noise import NoiseSharing
from fedlora.common.head_gradient import flat
from fedlora.common.model import HEAD
from fedlora.common.secure_aggregation.settings import check_head_range


@dataclass(frozen=True)
class HeadRound:
    """What a head round releases: the noisy gradient sum (flat), its noise std and the ledger entry;
    and the exact clipped sum, which stays here (the reply carries ``vector`` alone; a simulation's
    audit observer reads it to measure the noise added: simulations.canary_rounds)."""

    vector: Tensor
    noise_std: float
    entry: LedgerEntry | None
    exact: Tensor = field(repr=False)
    shared: bool = False
    """Its noise is a share of a secure sum's (the ledger's sigma C is the sum's, not this vector's)."""


def head_parameters(model: nn.Module) -> tuple[Tensor, Tensor]:
    """The classification head's weight and bias as the adapter holds them (PEFT's modules_to_save)."""
    state = peft_state(model)
    weight = next(v for k, v in state.items() if f".{HEAD}." in k and k.endswith(".weight"))
    bias = next(v for k, v in state.items() if f".{HEAD}." in k and k.endswith(".bias"))
    return weight, bias


def clipped_gradient_sum(
    features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, clip: float
) -> Tensor:
    """The sum over rows of each row's gradient of the cross-entropy wrt (weight, bias), each clipped
    to L2 norm ``clip`` by Opacus (per-sample gradients of GradSampleModule, DPOptimizer's clipping);
    flat as common.head_gradient lays it out."""
    head = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    wrapped = GradSampleModule(head, loss_reduction="sum")
    optimizer = DPOptimizer(
        torch.optim.SGD(head.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=max(1, len(labels)),
    )
    try:
        loss = nn.functional.cross_entropy(wrapped(features.to(weight.dtype)), labels, reduction="sum")
        with warnings.catch_warnings():
            # Opacus captures the head's input through a full backward hook; frozen features fire it
            # with this notice, which is exactly what it relies on.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        optimizer.clip_and_accumulate()
        return flat(head.weight.summed_grad, head.bias.summed_grad).detach()
    finally:
        wrapped.to_standard_module()


def head_round(
    model: nn.Module,
    data: TokenizedDataset,
    ledger: PrivacyLedger | None,
    server_round: int,
    clip: float,
    device: torch.device,
    batch_size: int,
    generator: torch.Generator | None = None,
    sharing: NoiseSharing | None = None,
) -> HeadRound:
    """Charge the round in the ledger first (one step at sample rate 1 at its noise; BudgetExceeded:
    nothing read), then the clipped gradient sum of every row plus noise of std sigma x ``clip``.
    Without a ledger (privacy off) the exact sum leaves. ``sharing`` (secure aggregation): the round's
    agreed noise, raised to the ledger's if below it (the coordinator cannot lower this institution's
    noise), is the sum's; this institution adds only its share and the ledger records both epsilons at
    it; without a ledger the share is still added, so that the sum covers the peers' claims. A gradient
    the quantisation range could clip is refused before anything is charged."""
    if sharing is not None:
        own = ledger.noise_multiplier if ledger is not None and ledger.noise_multiplier is not None else 0.0
        sharing = replace(sharing, sigma=max(own, sharing.sigma), clipping=clip)
        check_head_range(len(data), clip, sharing.share_std)
    entry = (
        ledger.reserve(server_round, 1.0, 1, federated=True, sharing=sharing) if ledger is not None else None
    )
    if sharing is not None:
        noise_std = sharing.share_std
    else:
        noise_std = entry.noise_multiplier * clip if entry is not None else 0.0
    features, labels = pooled_features(model, data, device, batch_size)
    weight, bias = (t.detach().to("cpu", torch.float32) for t in head_parameters(model))
    summed = clipped_gradient_sum(features, labels, weight, bias, clip)
    return HeadRound(noisy(summed, noise_std, generator), noise_std, entry, summed, sharing is not None)
