"""An institution's side of one round, as a state machine: each step once, in order.

1. ``advertise_keys`` -> its two public keys.
2. ``share_keys(roster)`` -> its self-mask seed and mask private key, Shamir-shared among the roster
   and sealed to each peer (the server routes them).
3. ``masked_input(sealed, vector)`` -> the quantised vector plus its self-mask and, for every peer
   that shared keys, the pairwise mask (added towards a higher id, subtracted towards a lower one).
4. ``unmask(survivors)`` -> shares of each survivor's seed and of each dropped peer's key.

The checks that keep masks secret run here, where the server cannot skip them: a roster or survivor
list below the threshold, or a threshold that is no strict majority, is refused; one survivor list
is answered once, so no peer's seed and key are both ever revealed (with a majority threshold, no
two survivor lists can each gather enough shares). ``context`` names the round (run and round number)
and binds every derived key and sealed share to it. The roster's keys are not signed: a server that
invents institutions is outside this (semi-honest) model until adverts are signed with node keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

from fedlora.common.errors import RoundDiscarded, SecureAggregationError
from fedlora.common.secure_aggregation import keys, prg, shamir
from fedlora.common.secure_aggregation.messages import Advert, UnmaskShares
from fedlora.common.secure_aggregation.quantise import Quantiser
from fedlora.common.secure_aggregation.settings import SecAggConfig

STAGES = ("advertise", "share", "mask", "unmask", "done")
MAX_NODE = 2**64


def check_nodes(nodes: Sequence[int]) -> None:
    """Node ids are Shamir's x-coordinates: positive 64-bit integers."""
    bad = [node for node in nodes if not isinstance(node, int) or not 0 < node < MAX_NODE]
    if bad:
        raise SecureAggregationError(
            f"secure aggregation: node id {bad[0]!r} is not a positive 64-bit integer"
        )


def pairwise_mask(own: int, peer: int, seed: bytes, length: int, ring_bits: int) -> np.ndarray:
    """The pair's mask with its sign: the lower id adds it and the higher subtracts it, so they cancel."""
    mask = prg.expand(seed, length, ring_bits)
    return mask if own < peer else -mask


class ClientRound:
    def __init__(self, node: int, config: SecAggConfig, context: bytes) -> None:
        check_nodes([node])
        self.node, self.config, self.context = node, config, context
        self._stage = 0
        self._cipher_key = keys.X25519PrivateKey.generate()
        self._mask_key = keys.X25519PrivateKey.generate()
        self._seed = prg.fresh_seed()
        self._roster: dict[int, Advert] = {}
        self._shares: dict[int, tuple[bytes, bytes]] = {}  # peer -> (its key share, its seed share)
        self._sharers: list[int] = []
        self.threshold = 0

    def to_bytes(self) -> bytes:
        """The whole state between two steps, for the ClientApp's context (a process per message in
        deployment, any Ray actor in simulation): it holds the round's private keys and seed, so it
        stays with the institution and is dropped after ``unmask``."""
        return json.dumps(
            {
                "node": self.node,
                "context": self.context.hex(),
                "stage": self._stage,
                "cipher": keys.private_bytes(self._cipher_key).hex(),
                "mask": keys.private_bytes(self._mask_key).hex(),
                "seed": self._seed.hex(),
                "roster": {str(n): [a.cipher.hex(), a.mask.hex()] for n, a in self._roster.items()},
                "shares": {str(n): [k.hex(), s.hex()] for n, (k, s) in self._shares.items()},
                "sharers": self._sharers,
                "threshold": self.threshold,
            }
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, config: SecAggConfig) -> ClientRound:
        """The round ``to_bytes`` wrote, at the step it had reached."""
        state = json.loads(raw)
        round_ = cls(int(state["node"]), config, bytes.fromhex(state["context"]))
        round_._stage = int(state["stage"])
        round_._cipher_key = keys.private_key(bytes.fromhex(state["cipher"]))
        round_._mask_key = keys.private_key(bytes.fromhex(state["mask"]))
        round_._seed = bytes.fromhex(state["seed"])
        round_._roster = {
            int(n): Advert(bytes.fromhex(c), bytes.fromhex(m)) for n, (c, m) in state["roster"].items()
        }
        round_._shares = {
            int(n): (bytes.fromhex(k), bytes.fromhex(s)) for n, (k, s) in state["shares"].items()
        }
        round_._sharers = [int(n) for n in state["sharers"]]
        round_.threshold = int(state["threshold"])
        return round_

    @property
    def roster_size(self) -> int:
        """The institutions that advertised keys (known from ``share_keys`` on)."""
        return len(self._roster)

    def _advance(self, stage: str) -> None:
        if STAGES[self._stage] != stage:
            raise SecureAggregationError(
                f"secure aggregation: node {self.node} asked to {stage} at stage {STAGES[self._stage]}"
            )
        self._stage += 1

    def advertise_keys(self) -> Advert:
        self._advance("advertise")
        return Advert(keys.public_bytes(self._cipher_key), keys.public_bytes(self._mask_key))

    def share_keys(self, roster: Mapping[int, Advert], threshold: int) -> dict[int, bytes]:
        """Sealed shares for each peer of the roster (every institution that advertised keys), any
        ``threshold`` of which reconstruct: a strict majority of the roster, else refused."""
        self._advance("share")
        check_nodes(list(roster))
        own = Advert(keys.public_bytes(self._cipher_key), keys.public_bytes(self._mask_key))
        if roster.get(self.node) != own:
            raise SecureAggregationError(
                f"secure aggregation: the roster misstates node {self.node}'s own keys"
            )
        published = [key for advert in roster.values() for key in advert]
        if len(set(published)) != len(published):
            raise SecureAggregationError("secure aggregation: the roster repeats a public key")
        self.config.check_capacity(len(roster))
        configured = self.config.threshold in (None, threshold)
        if not (len(roster) < 2 * threshold and 2 <= threshold <= len(roster) and configured):
            raise SecureAggregationError(
                f"secure aggregation: threshold {threshold} is no strict majority of the {len(roster)} "
                "institutions of the roster, below 2, or not the configured one"
            )
        self.threshold = threshold
        self._roster = dict(roster)
        key_shares = shamir.split(keys.private_bytes(self._mask_key), self.threshold, roster)
        seed_shares = shamir.split(self._seed, self.threshold, roster)
        self._shares[self.node] = (key_shares[self.node], seed_shares[self.node])
        return {
            peer: keys.seal(
                self._cipher_key, advert.cipher, self.context, self.node, peer,
                key_shares[peer] + seed_shares[peer],
            )
            for peer, advert in roster.items()
            if peer != self.node
        }  # fmt: skip

    def masked_input(self, sealed: Mapping[int, bytes], vector: np.ndarray) -> np.ndarray:
        """The masked, quantised ``vector`` (flattened), given the shares sealed to this node by every peer
        that shared keys (those, and only those, its pairwise masks involve)."""
        self._advance("mask")
        unknown = [peer for peer in sealed if peer not in self._roster or peer == self.node]
        if unknown:
            raise SecureAggregationError(
                f"secure aggregation: shares from node {unknown[0]}, not a peer of the roster"
            )
        if len(sealed) + 1 < self.threshold:
            raise RoundDiscarded(
                f"secure aggregation: {len(sealed) + 1} institutions shared keys, fewer than the threshold "
                f"{self.threshold}; nothing is masked"
            )
        for peer, ciphertext in sealed.items():
            plain = keys.open_sealed(
                self._cipher_key, self._roster[peer].cipher, self.context, peer, self.node, ciphertext
            )
            if len(plain) != 2 * shamir.SHARE_BYTES:
                raise SecureAggregationError(f"secure aggregation: the shares from node {peer} are malformed")
            self._shares[peer] = (plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :])
        self._sharers = sorted(self._shares)
        bits = self.config.ring_bits
        masked = Quantiser.of(self.config).quantise(np.ravel(vector))
        masked += prg.expand(self._seed, masked.size, bits)
        for peer in self._sharers:
            if peer != self.node:
                seed = keys.mask_seed(self._mask_key, self._roster[peer].mask, self.context)
                masked += pairwise_mask(self.node, peer, seed, masked.size, bits)
        return masked

    def unmask(self, survivors: Sequence[int]) -> UnmaskShares:
        """Shares of every survivor's self-mask seed and every dropped sharer's mask key, once."""
        self._advance("unmask")
        alive = set(survivors)
        if self.node not in alive or not alive <= set(self._sharers):
            raise SecureAggregationError(
                f"secure aggregation: the survivor list must hold node {self.node} and only peers that "
                "shared keys"
            )
        if len(alive) < self.threshold:
            raise RoundDiscarded(
                f"secure aggregation: {len(alive)} survivors, fewer than the threshold {self.threshold}; "
                "nothing is unmasked"
            )
        return UnmaskShares(
            seeds={peer: self._shares[peer][1] for peer in self._sharers if peer in alive},
            keys={peer: self._shares[peer][0] for peer in self._sharers if peer not in alive},
        )
