"""Distributed DP noise: each institution adds a share, so that only the sum carries the central noise.

Under secure aggregation the coordinator learns only the sum of the replies. If every sum holds at
least m honest institutions' shares (m = sampled - tolerated dropouts - tolerated colluders: the
dropouts' shares are missing from the sum, the colluders' are known to the coordinator and can be
subtracted), each institution adding Gaussian noise of std sigma C / sqrt(m) puts noise of std at
least sigma C on the sum: the central noise. An institution then accounts for its own sample rate at
noise multiplier sigma (the aggregation assumption) and, should the assumption fail (the coordinator
sees its reply alone), at noise multiplier sigma / sqrt(m), its share. Both epsilons are composed by
the same accountant (common.accounting); the ledger records both. Institutions with different budgets
first agree sigma (the largest planned multiplier of the round, client.secure_statistics), bound into
the round's keys (``agreed_context``), so that the sum carries every ledger's claim.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from fedlora.common.accounting import SampledGaussian
from fedlora.common.errors import ConfigError


@dataclass(frozen=True)
class NoiseSharing:
    """The central noise multiplier ``sigma`` for clipping norm ``clipping``, split between the
    ``sampled`` institutions of a round, ``dropouts`` of which may be missing from the sum and
    ``colluders`` of which may side with the coordinator."""

    sigma: float
    clipping: float
    sampled: int
    dropouts: int
    colluders: int

    def __post_init__(self) -> None:
        if self.honest < 1:
            raise ConfigError(
                f"distributed noise: {self.sampled} sampled - {self.dropouts} tolerated dropouts - "
                f"{self.colluders} tolerated colluders = {self.honest} institutions guaranteed in every "
                "sum; expected at least 1 (sample more institutions or tolerate fewer)"
            )

    @property
    def honest(self) -> int:
        """m: the institutions whose shares every aggregated sum is guaranteed to hold."""
        return self.sampled - self.dropouts - self.colluders

    @property
    def share_multiplier(self) -> float:
        """One institution's share as a noise multiplier: sigma / sqrt(m)."""
        return self.sigma / math.sqrt(self.honest)

    @property
    def share_std(self) -> float:
        """The std of the noise each institution adds: sigma C / sqrt(m)."""
        return self.share_multiplier * self.clipping

    def aggregated(self, sample_rate: float, steps: int) -> SampledGaussian:
        """One institution's steps as the sum's noise covers them (the aggregation assumption)."""
        return SampledGaussian(sample_rate, self.sigma, steps)

    def alone(self, sample_rate: float, steps: int) -> SampledGaussian:
        """The same steps with only the institution's own share, as if its reply were seen alone."""
        return SampledGaussian(sample_rate, self.share_multiplier, steps)


def agreed_context(context: bytes, sigma: float) -> bytes:
    """A secure round's context bound to the sigma it agreed (the largest advertised multiplier): every
    key and sealed share derives from it, so institutions shown different multipliers by an
    equivocating coordinator cannot open each other's shares, and the round stops before any sum
    with less noise than one of them claims could be unmasked."""
    return context + struct.pack(">d", sigma)
