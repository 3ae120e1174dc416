"""In-memory long-term identities for secure aggregation tests: one Ed25519 key per node and the
roster of them all (common.secure_aggregation.identity)."""

from __future__ import annotations

from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedlora.common.secure_aggregation.identity import Identity, Roster, public_bytes


def identities(nodes: Iterable[int]) -> dict[int, Identity]:
    """Each node's identity, all checking against the same roster of every node."""
    signing = {node: Ed25519PrivateKey.generate() for node in nodes}
    roster = Roster.of({f"node-{node}": public_bytes(key) for node, key in signing.items()})
    return {node: Identity(key, roster) for node, key in signing.items()}
