"""Masks: a 256-bit seed expanded by the ChaCha20 keystream into ring elements.

Each seed is used for one stream only (a fresh self-mask seed per round, a pairwise seed derived per
round from fresh keys), so the fixed zero nonce never repeats under a key. Unlike Flower's SecAgg+
generator (32 bits of seed into numpy's MT19937), nothing here can be brute-forced below 2^256.
"""

from __future__ import annotations

import secrets

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedlora.common.errors import SecureAggregationError
from fedlora.common.secure_aggregation.quantise import ring_dtype

SEED_BYTES = 32
NONCE = bytes(16)


def fresh_seed() -> bytes:
    """A self-mask seed from the operating system's CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


def expand(seed: bytes, count: int, ring_bits: int) -> np.ndarray:
    """``count`` ring elements of the keystream of ``seed`` (uniform in the ring)."""
    if len(seed) != SEED_BYTES:
        raise SecureAggregationError(
            f"secure aggregation: a mask seed must be {SEED_BYTES} bytes, got {len(seed)}"
        )
    dtype = ring_dtype(ring_bits)
    stream = (
        Cipher(algorithms.ChaCha20(seed, NONCE), mode=None).encryptor().update(bytes(count * dtype.itemsize))
    )
    return np.frombuffer(stream, dtype=dtype)
