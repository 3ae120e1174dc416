"""Fixed-point quantisation of float vectors into the ring Z_2^ring_bits, and back for the sum.

A value is clipped to [-clip, clip] and rounded to the nearest of ``2^bits - 1`` steps, an integer in
[0, 2^bits - 1]; the sum of n such integers stays below 2^ring_bits (``SecAggConfig.check_round``), so
the ring's wrap-around never corrupts the sum. Rounding is deterministic: applied after any DP noise
it is post-processing and costs no privacy. The dequantised sum is within n x step / 2 of the sum of
the clipped inputs (``Quantiser.sum_error``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlora.common.errors import SecureAggregationError
from fedlora.common.secure_aggregation.settings import SecAggConfig


def ring_dtype(ring_bits: int) -> np.dtype:
    """The unsigned numpy type whose wrapping arithmetic is the ring's."""
    return np.dtype(f"<u{ring_bits // 8}")


@dataclass(frozen=True)
class Quantiser:
    clip: float
    bits: int
    ring_bits: int

    @classmethod
    def of(cls, config: SecAggConfig) -> Quantiser:
        return cls(float(config.clip), config.quantisation_bits, config.ring_bits)

    @property
    def step(self) -> float:
        return 2 * self.clip / (2**self.bits - 1)

    def sum_error(self, count: int) -> float:
        """The most a dequantised sum of ``count`` contributions differs from the clipped inputs' sum."""
        return count * self.step / 2

    def quantise(self, values: np.ndarray) -> np.ndarray:
        """Clipped, rounded ring elements of a float vector; a non-finite value is refused."""
        values = np.asarray(values, dtype=np.float64)
        if not np.isfinite(values).all():
            raise SecureAggregationError("secure aggregation: the vector to mask has non-finite values")
        levels = np.rint((np.clip(values, -self.clip, self.clip) + self.clip) / self.step)
        return levels.astype(ring_dtype(self.ring_bits))

    def dequantise_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The float sum of ``count`` contributions whose ring sum is ``total``."""
        return total.astype(np.float64) * self.step - count * self.clip
