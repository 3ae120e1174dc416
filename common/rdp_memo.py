"""One DP-SGD step's RDP curve per mechanism, computed once per process.

Opacus' PRV accountant sizes its discretisation domain with RDP (``compute_safe_domain_size``) at
about 150 orders, most of them fractional and each a long series: nine tenths of a PRV composition
(README, "A thousand institutions"). RDP is linear in the steps: Opacus' ``compute_rdp`` computes
one step's curve and multiplies it by ``steps``. So a ledger that grows by a round of the same
mechanism pays that series again for nothing. ``memoize_opacus_rdp`` keeps one step's curve per
(sample rate, noise, orders) and multiplies as Opacus does, so every answer is bit for bit Opacus'
own; it swaps Opacus' module function once per process, on first use (never on import).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from opacus.accountants.analysis import rdp as opacus_rdp

_OPACUS_COMPUTE_RDP = opacus_rdp.compute_rdp


@lru_cache(maxsize=4096)
def _one_step(q: float, noise_multiplier: float, orders: tuple[float, ...]) -> np.ndarray:
    return _OPACUS_COMPUTE_RDP(q=q, noise_multiplier=noise_multiplier, steps=1, orders=list(orders))


def compute_rdp(
    *, q: float, noise_multiplier: float, steps: int, orders: list[float] | float
) -> np.ndarray | float:
    """Opacus' ``compute_rdp``, with one step's curve remembered (a scalar order is not)."""
    if isinstance(orders, float):
        return _OPACUS_COMPUTE_RDP(q=q, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
    return _one_step(q, noise_multiplier, tuple(orders)) * steps


def memoize_opacus_rdp() -> None:
    """Route Opacus' RDP accountant (and the PRV domain sizing that uses it) through ``compute_rdp``."""
    opacus_rdp.compute_rdp = compute_rdp
