"""FFA-LoRA: A is frozen at a shared seed, so averaging B averages the products exactly.

Only B and the non-LoRA tensors travel back; the global A is returned untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from fedlora.common.errors import AdapterError
from fedlora.common.lora_math import lora_pairs, lora_rank
from fedlora.server.aggregators.base import Aggregator, ClientUpdate, weighted_sum


class FfaAggregator(Aggregator):
    """Weighted mean of B (rescaled to the global scale) and of the non-LoRA tensors."""

    name = "ffa"

    def wire_keys(self, global_state: Mapping[str, Tensor]) -> list[str]:
        a_keys = {a_key for a_key, _ in lora_pairs(global_state).values()}
        return [key for key in global_state if key not in a_keys]

    def for_client(self, global_state: Mapping[str, Tensor], rank: int, scale: float) -> dict[str, Tensor]:
        """The global adapter, B rescaled to the client's scale; the rank is the frozen A's."""
        global_rank = lora_rank(global_state)
        if rank != global_rank:
            raise AdapterError(
                f"{self.name}: a client of rank {rank} cannot share the frozen A of rank {global_rank}"
            )
        state = dict(global_state)
        if scale != self.global_scale:
            for _, b_key in lora_pairs(global_state).values():
                state[b_key] = global_state[b_key] * (self.global_scale / scale)
        return state

    def _check(self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> list[float]:
        a_keys = {a_key for a_key, _ in lora_pairs(global_state).values()}
        for update in updates:
            if a_keys & update.state.keys():
                raise AdapterError(f"{self.name}: node {update.node_id} sent lora_A tensors; A is frozen")
        return super()._check(global_state, updates)

    def _combine(
        self,
        global_state: Mapping[str, Tensor],
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        b_keys = {b_key for _, b_key in lora_pairs(global_state).values()}
        # B trained at scale_i contributes scale_i / global_scale of itself at the global scale.
        b_weights = [w * u.scale / self.global_scale for w, u in zip(weights, updates, strict=True)]
        state = dict(global_state)
        for key in self.wire_keys(global_state):
            mean = weighted_sum((u.state[key] for u in updates), b_weights if key in b_keys else weights)
            state[key] = mean.to(global_state[key].dtype)
        return state, {}
