"""FedAvg of A and B apart: the peers' way, kept as the baseline.

It is biased: mean(B) @ mean(A) != mean(B @ A). The metrics measure by how much, per layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedlora.common.lora_math import lora_pairs, product, relative_error
from fedlora.server.aggregators.base import (
    Aggregator,
    ClientUpdate,
    mean_product,
    residual_metrics,
    weighted_sum,
)


class FedAvgAggregator(Aggregator):
    """Weighted mean of every tensor separately; all clients must share the global shapes."""

    name = "fedavg"

    def _combine(
        self,
        global_state: Mapping[str, Tensor],
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        state = {
            key: weighted_sum((u.state[key] for u in updates), weights).to(tensor.dtype)
            for key, tensor in global_state.items()
        }
        residuals = {
            prefix: relative_error(
                mean_product(updates, weights, a_key, b_key),
                product(
                    state[a_key].to(torch.float64),
                    state[b_key].to(torch.float64),
                    self.global_scale,
                ),
            )
            for prefix, (a_key, b_key) in lora_pairs(global_state).items()
        }
        return state, residual_metrics(residuals)
