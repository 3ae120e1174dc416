"""Key agreement and the sealed shares: X25519 per round, HKDF-SHA256, ChaCha20-Poly1305.

Every institution makes two X25519 key pairs per round: one whose agreements seed the pairwise masks,
one whose agreements key the encryption of its Shamir shares to each peer (the server routes them and
must not read them). HKDF's ``info`` separates the purposes, the round (``context``) and, for the
shares, the direction, so no key ever encrypts under a repeated nonce.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlora.common.errors import SecureAggregationError

PUBLIC_BYTES = 32
NONCE_BYTES = 12
MASK_PURPOSE = b"fedlora secagg pairwise mask"
SHARE_PURPOSE = b"fedlora secagg share encryption"


def node_bytes(node: int) -> bytes:
    """A node id (Flower's are 64-bit) as it enters derivations and associated data."""
    return node.to_bytes(8, "big")


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def private_key(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def agree(key: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends derive alike: HKDF-SHA256 of the X25519 agreement, bound to ``info``."""
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:
        raise SecureAggregationError(f"secure aggregation: unusable peer public key ({err})") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def mask_seed(key: X25519PrivateKey, peer_public: bytes, context: bytes) -> bytes:
    """The seed of the pairwise mask two institutions share in the round ``context``."""
    return agree(key, peer_public, MASK_PURPOSE + context)


def _share_key(
    key: X25519PrivateKey, peer_public: bytes, context: bytes, sender: int, receiver: int
) -> bytes:
    return agree(key, peer_public, SHARE_PURPOSE + context + node_bytes(sender) + node_bytes(receiver))


def seal(
    key: X25519PrivateKey, peer_public: bytes, context: bytes, sender: int, receiver: int, plain: bytes
) -> bytes:
    """``plain`` for ``receiver`` only; the server that routes it can neither read nor alter it."""
    nonce = os.urandom(NONCE_BYTES)
    aad = context + node_bytes(sender) + node_bytes(receiver)
    sealed = ChaCha20Poly1305(_share_key(key, peer_public, context, sender, receiver)).encrypt(
        nonce, plain, aad
    )
    return nonce + sealed


def open_sealed(
    key: X25519PrivateKey, peer_public: bytes, context: bytes, sender: int, receiver: int, sealed: bytes
) -> bytes:
    """What ``sender`` sealed for ``receiver``; a tampered, rerouted or replayed ciphertext is refused."""
    aad = context + node_bytes(sender) + node_bytes(receiver)
    aead = ChaCha20Poly1305(_share_key(key, peer_public, context, sender, receiver))
    try:
        return aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):  # ValueError: too short to hold a nonce
        raise SecureAggregationError(
            f"secure aggregation: the shares from node {sender} fail authentication (tampered or misrouted)"
        ) from None
