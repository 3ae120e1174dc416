"""The coordinator's side of a head round (common.head_gradient): the institutions' noisy head-gradient
sums added up, divided by the rows they stand for, and one SGD step of the global head.

The divisor is round 0's released (noisy) summed counts, which the server already holds, scaled by the
share of round 0's institutions whose gradient arrived: no row count leaves in a head round, and the
same divisor is known when the sum is unmasked under secure aggregation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.common.head_gradient import unflat
from fedlora.server.history import RoundLog


@dataclass(frozen=True)
class SecureHead:
    """A round's secure head sum (server.secure_head) for the strategy to step as summed head replies:
    its log (dropped nodes, the survivors' masked replies' metrics, the protocol's ``secagg_*``
    figures) and the unmasked sum of ``survivors`` institutions, None where it was discarded."""

    record: RoundLog
    total: Tensor | None
    survivors: int


def summed_gradient(vectors: Sequence[Tensor]) -> Tensor:
    """The replies' vectors added up (float64, in the given order)."""
    return torch.stack([v.to(torch.float64) for v in vectors]).sum(0)


def rows_in_sum(released_rows: float, released_by: int, replies: int) -> float:
    """The rows a sum of ``replies`` gradients stands for: round 0's summed counts ``released_rows``
    (from ``released_by`` institutions), times the share of them that replied; at least one row."""
    return max(1.0, released_rows * replies / max(1, released_by))


def head_step(weight: Tensor, bias: Tensor, summed: Tensor, rows: float, lr: float) -> tuple[Tensor, Tensor]:
    """One SGD step of the head on the mean gradient ``summed / rows``, in the head's dtype."""
    grad_w, grad_b = unflat(summed.to(torch.float64) / rows, *weight.shape)
    new_w = weight.to(torch.float64) - lr * grad_w
    new_b = bias.to(torch.float64) - lr * grad_b
    return new_w.to(weight.dtype), new_b.to(bias.dtype)
