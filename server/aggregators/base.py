"""The aggregator interface: how the server turns client adapters into the next global adapter.

Updates are validated here once (keys, shapes, finite values, weights), so each aggregator only
says how to combine them.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedlora.common.catalogue import AGGREGATORS as AGGREGATOR_ENTRIES
from fedlora.common.catalogue import AggregatorEntry
from fedlora.common.errors import AdapterError
from fedlora.common.lora_math import layer_products, lora_pairs, lora_rank, product, truncate_state


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply: its adapter after local training, at its own rank and scale."""

    node_id: int
    state: dict[str, Tensor]
    num_examples: float  # the weight the server grants: the claimed count, bounded by the strategy
    scale: float
    start: dict[str, Tensor] | None = None  # what the client received (its rank's truncation), if known


@dataclass
class AggregationResult:
    state: dict[str, Tensor]
    metrics: dict[str, float]


class Aggregator(ABC):
    """Combines client adapters into the global adapter (global rank, ``global_scale``)."""

    name: ClassVar[str]
    entry: ClassVar[AggregatorEntry]
    """Its name's capabilities in the catalogue; a class whose name is not there is refused."""
    mixed_ranks: ClassVar[bool]
    mixed_scales: ClassVar[bool]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.entry = AGGREGATOR_ENTRIES[cls.name]
        cls.mixed_ranks, cls.mixed_scales = cls.entry.mixed_ranks, cls.entry.mixed_scales

    def __init__(self, global_scale: float) -> None:
        if not global_scale > 0:
            raise ValueError(f"{self.name}: global_scale must be > 0, got {global_scale}")
        self.global_scale = float(global_scale)

    def aggregate(
        self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]
    ) -> AggregationResult:
        """The next global adapter; weights are each client's share of the examples."""
        start = time.perf_counter()
        weights = self._check(global_state, updates)
        state, metrics = self._combine(global_state, updates, weights)
        metrics["aggregation_seconds"] = time.perf_counter() - start
        return AggregationResult(state, metrics)

    @abstractmethod
    def _combine(
        self,
        global_state: Mapping[str, Tensor],
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The new global state and metrics from validated updates and their weights."""

    def for_client(self, global_state: Mapping[str, Tensor], rank: int, scale: float) -> dict[str, Tensor]:
        """What a client of ``rank`` and ``scale`` receives: the same product, at its rank."""
        if rank == lora_rank(global_state) and scale == self.global_scale:
            return dict(global_state)
        return truncate_state(global_state, rank, self.global_scale, scale)

    def wire_keys(self, global_state: Mapping[str, Tensor]) -> list[str]:
        """The keys clients send back."""
        return list(global_state)

    def state_dict(self) -> dict[str, Tensor]:
        """Server-held state that a checkpoint must keep for the next round to be the same."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if state:
            raise AdapterError(f"{self.name}: holds no server state, got {', '.join(state)}")

    def _check(self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> list[float]:
        """Reject what cannot be aggregated, naming node and key; return the weights."""
        if not updates:
            raise ValueError(f"{self.name}: no updates to aggregate")
        expected = self.reply_shapes(global_state)
        for update in updates:
            where = f"{self.name}: node {update.node_id}"
            if update.num_examples < 0 or not update.scale > 0:
                raise AdapterError(
                    f"{where}: needs num_examples >= 0 and scale > 0, "
                    f"got {update.num_examples} and {update.scale}"
                )
            missing = [key for key in expected if key not in update.state]
            if missing:
                raise AdapterError(f"{where}: missing key {missing[0]}")
            extra = [key for key in update.state if key not in expected]
            if extra:
                raise AdapterError(f"{where}: unexpected key {extra[0]}")
            for key, shape in expected.items():
                tensor = update.state[key]
                if tensor.ndim != len(shape) or any(
                    want is not None and got != want for got, want in zip(tensor.shape, shape, strict=True)
                ):
                    wanted = ", ".join("r" if want is None else str(want) for want in shape)
                    raise AdapterError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected ({wanted})")
                if not torch.isfinite(tensor).all():
                    raise AdapterError(f"{where}: {key} has non-finite values")
            if self.mixed_ranks:
                try:
                    lora_pairs(update.state)
                except AdapterError as err:
                    raise AdapterError(f"{where}: {err}") from None
        total = sum(update.num_examples for update in updates)
        if total == 0:
            raise AdapterError(f"{self.name}: the updates carry no examples")
        return [update.num_examples / total for update in updates]

    def reply_shapes(self, global_state: Mapping[str, Tensor]) -> dict[str, tuple[int | None, ...]]:
        """Shape each wire key must have; None where the client's own rank goes."""
        pairs = lora_pairs(global_state)
        if not pairs:
            raise AdapterError(f"{self.name}: the global adapter has no LoRA layers")
        shapes: dict[str, tuple[int | None, ...]] = {
            key: tuple(global_state[key].shape) for key in self.wire_keys(global_state)
        }
        if self.mixed_ranks:
            for a_key, b_key in pairs.values():
                shapes[a_key] = (None, global_state[a_key].shape[1])
                shapes[b_key] = (global_state[b_key].shape[0], None)
        return shapes


def weighted_sum(tensors: Iterable[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i w_i t_i`` in float64, so rounding does not grow with the number of clients."""
    total: Tensor | None = None
    for tensor, weight in zip(tensors, weights, strict=True):
        term = weight * tensor.to(torch.float64)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("weighted_sum of no tensors")
    return total


def mean_product(updates: Sequence[ClientUpdate], weights: Sequence[float], a_key: str, b_key: str) -> Tensor:
    """The weighted mean of the clients' products ``scale_i * B_i @ A_i`` (float64): the target."""
    return weighted_sum(
        (
            product(u.state[a_key].to(torch.float64), u.state[b_key].to(torch.float64), u.scale)
            for u in updates
        ),
        weights,
    )


def residual_metrics(residuals: Mapping[str, float]) -> dict[str, float]:
    """``residual/<layer prefix>`` per layer and their mean ``residual/mean``."""
    metrics = {f"residual/{prefix}": value for prefix, value in residuals.items()}
    metrics["residual/mean"] = sum(residuals.values()) / len(residuals)
    return metrics


def weight_change_norm(start: Mapping[str, Tensor], after: Mapping[str, Tensor], scale: float) -> float:
    """L2 norm of what a reply does to the weights: per LoRA layer ``scale * B @ A`` after minus
    before, plus the change of every other tensor. Bounding the factors instead would let a claimed
    scale shrink or inflate the real change at will."""
    lora_keys = {key for pair in lora_pairs(after).values() for key in pair}
    total = sum(
        float((after[key].double() - start[key].double()).pow(2).sum())
        for key in after
        if key not in lora_keys
    )
    before = layer_products(start, scale)
    for prefix, changed in layer_products(after, scale).items():
        total += float((changed - before[prefix]).pow(2).sum())
    return math.sqrt(total)


def bounded_weights(claims: Sequence[float], max_examples: float | None, max_share: float) -> list[float]:
    """Each reply's weight: its claimed count capped at ``max_examples``, then at ``max_share`` of the
    total (the largest are lowered to one common cap that holds exactly); equal weights when no cap
    can hold (``len(claims) * max_share <= 1``). A claim cannot be checked, so no reply outweighs the
    rest however much it claims."""
    weights = [min(c, max_examples) if max_examples is not None else float(c) for c in claims]
    if len(weights) * max_share <= 1:
        return [1.0] * len(weights)
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    rest, capped = sum(weights), 0
    cap = max_share * rest
    while capped < len(weights) - 1 and weights[order[capped]] > cap:
        rest -= weights[order[capped]]
        capped += 1
        cap = max_share * rest / (1 - max_share * capped)
    for i in order[:capped]:
        weights[i] = cap
    return weights
