"""The round's global adapter as each node receives it: at the coordinator's rank and scale, or
truncated to a node's own (with what the truncation drops), computed once per layout and round."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.common.adapter import State
from fedlora.common.lora_math import dropped_factors
from fedlora.server.aggregators import Aggregator


@dataclass(frozen=True)
class Layout:
    """The coordinator's adapter: what every message states and every reply must match."""

    fingerprint: str
    lora_r: int
    lora_scale: float


class GlobalAdapter:
    """``state`` at the coordinator's layout; `own` and `fold` at a client's rank and scale."""

    def __init__(self, state: State, aggregator: Aggregator, layout: Layout) -> None:
        self.state = state
        self.aggregator = aggregator
        self.layout = layout
        self._cache: dict[tuple[str, int, float], State] = {}

    def own(self, rank: int, scale: float) -> State:
        """The global adapter at a client's rank and scale (an SVD per layer): what it receives and
        what its reply is a change of."""
        key = ("own", rank, scale)
        if key not in self._cache:
            self._cache[key] = self.aggregator.for_client(self.state, rank, scale)
        return self._cache[key]

    def fold(self, rank: int, scale: float) -> State:
        """What the truncation to ``rank`` drops, as LoRA factors of the rank difference."""
        key = ("fold", rank, scale)
        if key not in self._cache:
            own = self.own(rank, scale)
            self._cache[key] = dropped_factors(
                self.state, own, self.layout.lora_r - rank, self.layout.lora_scale, scale
            )
        return self._cache[key]
