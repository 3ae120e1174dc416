"""Exact aggregation: average the products, then re-factorize to the global rank.

Clients may train at different ranks. The only loss is the truncation to the global rank, reported
per layer; with error feedback the server keeps what was cut and adds it back next round
(FedEx-LoRA's residual, held on the server instead of folded into the base weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from fedlora.common.errors import AdapterError
from fedlora.common.lora_math import factorize, lora_pairs, product
from fedlora.server.aggregators.base import (
    Aggregator,
    ClientUpdate,
    mean_product,
    residual_metrics,
    weighted_sum,
)

_RESIDUAL = "residual/"


class ExactAggregator(Aggregator):
    """Best rank-r approximation of the weighted mean of ``scale_i * B_i @ A_i`` per layer."""

    name = "exact"

    def __init__(self, global_scale: float, *, error_feedback: bool = False) -> None:
        super().__init__(global_scale)
        self.error_feedback = error_feedback
        self._residuals: dict[str, Tensor] = {}

    def _combine(
        self,
        global_state: Mapping[str, Tensor],
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        pairs = lora_pairs(global_state)
        lora_keys = {key for pair in pairs.values() for key in pair}
        state = dict(global_state)
        for key in global_state.keys() - lora_keys:
            state[key] = weighted_sum((u.state[key] for u in updates), weights).to(global_state[key].dtype)
        residuals: dict[str, float] = {}
        carried: dict[str, Tensor] = {}
        for prefix, (a_key, b_key) in pairs.items():
            target = self._target(global_state, updates, weights, a_key, b_key)
            if prefix in self._residuals:
                previous = self._residuals[prefix]
                if previous.shape != target.shape:
                    raise AdapterError(
                        f"{self.name}: carried residual of {prefix} has shape "
                        f"{tuple(previous.shape)}, the layer {tuple(target.shape)}"
                    )
                target = target + previous.to(target.device)
            rank = global_state[a_key].shape[0]
            a, b, residuals[prefix] = factorize(target, rank, self.global_scale)
            if self.error_feedback:
                carried[prefix] = target - product(
                    a.to(torch.float64), b.to(torch.float64), self.global_scale
                )
            state[a_key] = a.to(global_state[a_key].dtype)
            state[b_key] = b.to(global_state[b_key].dtype)
        self._residuals = carried
        return state, residual_metrics(residuals)

    def _target(
        self,
        global_state: Mapping[str, Tensor],
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
        a_key: str,
        b_key: str,
    ) -> Tensor:
        """The weighted mean of the products; when the server knows what each client started from,
        the global product plus the mean *change*, so a client that received a lower-rank
        truncation does not drag the global toward that truncation (same result at equal ranks)."""
        mean = mean_product(updates, weights, a_key, b_key)
        if any(u.start is None for u in updates):
            return mean
        started = mean_product([replace(u, state=u.start) for u in updates], weights, a_key, b_key)
        g = product(
            global_state[a_key].to(torch.float64), global_state[b_key].to(torch.float64), self.global_scale
        )
        return g + mean - started

    def state_dict(self) -> dict[str, Tensor]:
        """The error-feedback residual of each layer (float64), keyed ``residual/<prefix>``."""
        return {f"{_RESIDUAL}{prefix}": tensor for prefix, tensor in self._residuals.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if state and not self.error_feedback:
            raise AdapterError(f"{self.name}: checkpoint holds residuals but error_feedback is off")
        foreign = [key for key in state if not key.startswith(_RESIDUAL)]
        if foreign:
            raise AdapterError(f"{self.name}: unexpected server state key {foreign[0]}")
        self._residuals = {
            key.removeprefix(_RESIDUAL): tensor.to(torch.float64) for key, tensor in state.items()
        }
