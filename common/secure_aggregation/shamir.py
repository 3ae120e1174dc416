"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret is the constant term of a random polynomial of degree threshold - 1 whose other coefficients
come from the OS's CSPRNG; a share is its value at a node id (never 0). Any threshold shares give the
secret back by Lagrange interpolation at 0; fewer are consistent with every secret alike. Written
here (40 lines of Python ints) because the one on the index, pycryptodome's ``Crypto.Protocol.SecretSharing``,
shares only 16-byte secrets over GF(2^128) and would add a dependency.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

from fedlora.common.errors import SecureAggregationError

PRIME = 2**521 - 1  # a Mersenne prime: every 32-byte secret and 64-bit node id is a field element
SHARE_BYTES = 66
SECRET_BYTES = 32


def split(secret: bytes, threshold: int, nodes: Iterable[int]) -> dict[int, bytes]:
    """One share of ``secret`` per node; any ``threshold`` of them reconstruct it."""
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for node in nodes:
        value = 0
        for coefficient in reversed(coefficients):
            value = (value * node + coefficient) % PRIME
        shares[node] = value.to_bytes(SHARE_BYTES, "big")
    return shares


def interpolate_at_zero(points: Mapping[int, int]) -> int:
    """The value at 0 of the polynomial of degree len(points) - 1 through ``points``."""
    total = 0
    for node, value in points.items():
        numerator, denominator = 1, 1
        for other in points:
            if other != node:
                numerator = numerator * other % PRIME
                denominator = denominator * (other - node) % PRIME
        total = (total + value * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares; fewer are refused, never guessed from."""
    if len(shares) < threshold:
        raise SecureAggregationError(
            f"secure aggregation: {len(shares)} shares cannot reconstruct a secret of threshold {threshold}"
        )
    chosen = dict(sorted(shares.items())[:threshold])
    if any(len(share) != SHARE_BYTES for share in chosen.values()):
        raise SecureAggregationError(f"secure aggregation: a share is not {SHARE_BYTES} bytes")
    secret = interpolate_at_zero({node: int.from_bytes(share, "big") for node, share in chosen.items()})
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise SecureAggregationError("secure aggregation: the shares are inconsistent (no 32-byte secret)")
    return secret.to_bytes(SECRET_BYTES, "big")
