"""Server-side aggregators of LoRA adapters, chosen by name (``federation.aggregator``)."""

from __future__ import annotations

import inspect
from typing import Any

from fedlora.server.aggregators.base import (
    AggregationResult,
    Aggregator,
    ClientUpdate,
    bounded_weights,
    weight_change_norm,
)
from fedlora.server.aggregators.exact import ExactAggregator
from fedlora.server.aggregators.fedavg import FedAvgAggregator
from fedlora.server.aggregators.ffa import FfaAggregator

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (FedAvgAggregator, ExactAggregator, FfaAggregator)
}
"""The class of each name in the catalogue (``fedlora.common.catalogue.AGGREGATORS``), in its order."""


def create_aggregator(name: str, **options: Any) -> Aggregator:
    """The aggregator ``name``, built from its keyword options (``global_scale`` and its own)."""
    cls = AGGREGATORS.get(name)
    if cls is None:
        raise ValueError(f"unknown aggregator {name!r} (known: {', '.join(AGGREGATORS)})")
    accepted = inspect.signature(cls).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"aggregator {name!r} takes no option {unknown[0]!r} (it takes: {', '.join(accepted)})"
        )
    return cls(**options)


__all__ = [
    "AGGREGATORS",
    "AggregationResult",
    "Aggregator",
    "ClientUpdate",
    "ExactAggregator",
    "FedAvgAggregator",
    "FfaAggregator",
    "bounded_weights",
    "create_aggregator",
    "weight_change_norm",
]
