"""What travels in a round, as bytes and ints that fit Flower's RecordDicts (the masked vector itself
is a numpy array of the ring's dtype)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class Advert(NamedTuple):
    """An institution's two public keys of the round (32 bytes each)."""

    cipher: bytes
    mask: bytes


@dataclass(frozen=True)
class SignedAdvert:
    """An advert as the roster relays it: the keys and planned noise multiplier, signed by the
    institution's long-term identity (Ed25519 public key, 32 bytes; signature, 64 bytes) over the round's
    context and its node id (common.secure_aggregation.identity.advert_message)."""

    keys: Advert
    noise: float
    identity: bytes
    signature: bytes


@dataclass(frozen=True)
class UnmaskShares:
    """A survivor's answer: its shares of each survivor's self-mask seed (``seeds``) and of each
    dropped institution's mask key (``keys``); never both for the same institution."""

    seeds: dict[int, bytes]
    keys: dict[int, bytes]
