"""LoRA factor algebra shared by clients and server.

A LoRA layer contributes ``scale * B @ A`` to its base weight. Averaging A and B apart does not
average these products, so the server works on products and re-factorizes them; clients of another
rank get the same product truncated to their rank. Pure torch on PEFT state dicts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from fedlora.common.errors import AdapterError

_A = ".lora_A."
_B = ".lora_B."


def lora_pairs(state: Mapping[str, Tensor]) -> dict[str, tuple[str, str]]:
    """Map each LoRA layer prefix to its (A key, B key); keys without a LoRA marker are not LoRA.

    Raises AdapterError when a factor lacks its partner or the two cannot form ``B @ A``.
    """
    pairs: dict[str, tuple[str, str]] = {}
    for key in state:
        if _A in key:
            marker, other = _A, _B
        elif _B in key:
            marker, other = _B, _A
        else:
            continue
        prefix, _, rest = key.partition(marker)
        partner = f"{prefix}{other}{rest}"
        if partner not in state:
            raise AdapterError(f"{key}: LoRA factor without its partner {partner}")
        a_key, b_key = (key, partner) if marker == _A else (partner, key)
        if pairs.get(prefix, (a_key, b_key)) != (a_key, b_key):
            raise AdapterError(f"{key}: layer {prefix} has more than one LoRA pair")
        a, b = state[a_key], state[b_key]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{a_key} {tuple(a.shape)} and {b_key} {tuple(b.shape)}: expected A [r, in] "
                "and B [out, r] with the same r"
            )
        pairs[prefix] = (a_key, b_key)
    return pairs


def lora_rank(state: Mapping[str, Tensor]) -> int:
    """The rank shared by every LoRA layer of ``state``."""
    ranks = {prefix: state[a_key].shape[0] for prefix, (a_key, _) in lora_pairs(state).items()}
    if not ranks:
        raise AdapterError("adapter has no LoRA layers (no .lora_A./.lora_B. keys)")
    if len(set(ranks.values())) > 1:
        detail = ", ".join(f"{prefix}: {r}" for prefix, r in ranks.items())
        raise AdapterError(f"LoRA layers disagree on the rank ({detail})")
    return next(iter(ranks.values()))


def product(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """The layer's weight update ``scale * B @ A``."""
    return scale * (b @ a)


def relative_error(target: Tensor, approx: Tensor) -> float:
    """``||target - approx||_F / ||target||_F``; 0 when both agree, even at zero."""
    diff = torch.linalg.matrix_norm(target - approx)
    return float(diff / torch.linalg.matrix_norm(target)) if diff > 0 else 0.0


def factorize(
    p: Tensor, rank: int, scale: float, start: Tensor | None = None
) -> tuple[Tensor, Tensor, float]:
    """Best rank-``rank`` factors (A, B) with ``scale * B @ A`` ~ ``p``, and the relative residual.

    Singular values are split evenly between the factors so neither dominates the next local
    training. A direction that carries nothing (beyond ``p``'s numerical rank, or all of a zero
    ``p``) gets LoRA's own start instead of zeros: B zero, A the row of ``start`` (the A of the
    adapter being re-factorized) where it has one, else a fixed pseudo-random row. Both zero would
    get no gradient, and a client of a higher rank than the global adapter, or one that starts from
    an untrained one, would train nothing there. Rows from ``start`` keep an untrained global
    adapter's A: clients of every rank then train in nested row spaces that the global rank holds,
    instead of rows of their own that its truncation cuts. Every party computes the same rows.
    The residual is measured against the float32 factors returned, i.e. what is actually shipped.
    """
    if p.ndim != 2:
        raise AdapterError(f"cannot factorize a tensor of shape {tuple(p.shape)}: expected 2-D")
    if rank < 1 or scale <= 0:
        raise ValueError(f"factorize needs rank >= 1 and scale > 0, got {rank} and {scale}")
    p64 = p.to(torch.float64)
    u, s, vh = torch.linalg.svd(p64, full_matrices=False)
    # LAPACK builds may flip a singular pair's signs; parties that factorise the same product apart
    # (a client truncating, the server reconstructing its start) must agree: largest |u| entry > 0.
    signs = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True)))
    u, vh = u * signs, vh * signs.T
    live = int((s[:rank] > _NULL * s[0]).sum())  # singular values descend: the live ones lead
    root = s[:live].sqrt() / math.sqrt(scale)
    b = p64.new_zeros(p.shape[0], rank)
    a = p64.new_zeros(rank, p.shape[1])
    b[:, :live] = u[:, :live] * root
    a[:live] = root[:, None] * vh[:live]
    if live < rank:
        a[live:] = _start_rows(rank, p.shape[1], start)[live:]
    a, b = a.to(torch.float32), b.to(torch.float32)
    residual = relative_error(p64, product(a.to(torch.float64), b.to(torch.float64), scale))
    return a, b, residual


_NULL = 1e-6
"""Singular values below this fraction of the largest are zero at float32 precision (what ships)."""


def _start_rows(rank: int, fan_in: int, start: Tensor | None) -> Tensor:
    """``start``'s rows, then fixed rows in PEFT's A range (kaiming-uniform, a=sqrt(5): +-1/sqrt(fan_in))."""
    g = torch.Generator().manual_seed(0)
    bound = 1.0 / math.sqrt(fan_in)
    rows = (torch.rand(rank, fan_in, generator=g, dtype=torch.float64) * 2 - 1) * bound
    if start is not None:
        kept = min(rank, start.shape[0])
        rows[:kept] = start[:kept].to(torch.float64)
    return rows


def truncate_state(
    state: Mapping[str, Tensor], rank: int, scale_from: float, scale_to: float
) -> dict[str, Tensor]:
    """Re-factorize every LoRA pair to ``rank`` at ``scale_to``; other tensors pass through."""
    result = dict(state)
    pairs = lora_pairs(state)
    for prefix, p in layer_products(state, scale_from).items():
        a_key, b_key = pairs[prefix]
        new_a, new_b, _ = factorize(p, rank, scale_to, start=state[a_key])
        result[a_key], result[b_key] = new_a.to(state[a_key].dtype), new_b.to(state[b_key].dtype)
    return result


def layer_products(state: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """Per LoRA layer prefix, its weight update ``scale * B @ A`` (float64)."""
    return {
        prefix: product(state[a_key].to(torch.float64), state[b_key].to(torch.float64), scale)
        for prefix, (a_key, b_key) in lora_pairs(state).items()
    }


def dropped_by_truncation(
    state: Mapping[str, Tensor], truncated: Mapping[str, Tensor], scale_from: float, scale_to: float
) -> dict[str, Tensor]:
    """Per LoRA layer prefix, the product ``state`` holds that ``truncated`` lost (float64)."""
    kept = layer_products(truncated, scale_to)
    return {prefix: full - kept[prefix] for prefix, full in layer_products(state, scale_from).items()}


def dropped_factors(
    state: Mapping[str, Tensor],
    truncated: Mapping[str, Tensor],
    rank: int,
    scale_from: float,
    scale_to: float,
) -> dict[str, Tensor]:
    """What ``truncated`` lost, as LoRA factors (``state``'s LoRA keys) of ``rank`` at ``scale_to``:
    exact when ``rank`` is ``state``'s rank minus ``truncated``'s."""
    pairs = lora_pairs(state)
    factors: dict[str, Tensor] = {}
    for prefix, dropped in dropped_by_truncation(state, truncated, scale_from, scale_to).items():
        a_key, b_key = pairs[prefix]
        factors[a_key], factors[b_key], _ = factorize(dropped, rank, scale_to)
    return factors
