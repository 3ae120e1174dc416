"""An institution's side of one round, as a state machine: each step once, in order.

1. ``advertise_keys(noise)`` -> its two public keys and planned noise multiplier, signed with its
   long-term identity (common.secure_aggregation.identity) over the round's context and its node id.
2. ``share_keys(roster)`` -> every roster entry verified against the roster of identities it holds out
   of band (an unknown identity, one used twice, a bad signature: that peer is refused, and too few
   left refuses the round); the round's noise agreed (the largest verified multiplier, bound into the
   context); its self-mask seed and mask private key Shamir-shared among the verified peers and sealed
   to each (the server routes them).
3. ``masked_input(sealed, vector)`` -> the quantised vector plus its self-mask and, for every peer
   that shared keys, the pairwise mask (added towards a higher id, subtracted towards a lower one).
4. ``sign_survivors(survivors)`` -> its signature over the survivor list it was sent (Bell et al.'s
   consistency check), the list kept.
5. ``unmask(signatures)`` -> only when at least threshold survivors signed that same list: shares of
   each survivor's seed and of each dropped peer's key.

The checks that keep masks secret run here, where the server cannot skip them: a roster or survivor list
below the threshold, or a threshold not above (roster + tolerated colluders) / 2, is refused; one
survivor list is signed and answered once, and only with threshold signatures over it, so a coordinator
that tells survivors different lists gets no answer (no peer's seed and key both leave, colluders or
not), and one that substitutes an institution's keys gets no share sealed to its own. ``context`` names
the round (run and round number) and binds every derived key and sealed share to it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from fedlora.common.distributed_noise import agreed_context
from fedlora.common.errors import RoundDiscarded, SecureAggregationError
from fedlora.common.secure_aggregation import keys, prg, shamir
from fedlora.common.secure_aggregation.identity import (
    Identity,
    advert_message,
    survivors_message,
    verify,
)
from fedlora.common.secure_aggregation.messages import Advert, SignedAdvert, UnmaskShares
from fedlora.common.secure_aggregation.quantise import Quantiser
from fedlora.common.secure_aggregation.settings import SecAggConfig

STAGES = ("advertise", "share", "mask", "consistency", "unmask", "done")
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
    def __init__(self, node: int, config: SecAggConfig, context: bytes, identity: Identity) -> None:
        """``identity``: the institution's signing key and roster, loaded per message (never in
        ``to_bytes``)."""
        check_nodes([node])
        self.node, self.config, self.context, self.identity = node, config, context, identity
        self._stage = 0
        self._cipher_key = keys.X25519PrivateKey.generate()
        self._mask_key = keys.X25519PrivateKey.generate()
        self._seed = prg.fresh_seed()
        self._roster: dict[int, Advert] = {}
        self._identities: dict[int, bytes] = {}  # verified peer -> its long-term public key
        self._shares: dict[int, tuple[bytes, bytes]] = {}  # peer -> (its key share, its seed share)
        self._sharers: list[int] = []
        self._survivors: list[int] = []
        self.threshold = 0
        self.agreed_noise = 0.0

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
                "identities": {str(n): key.hex() for n, key in self._identities.items()},
                "sharers": self._sharers,
                "survivors": self._survivors,
                "threshold": self.threshold,
                "agreed_noise": self.agreed_noise,
            }
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, config: SecAggConfig, identity: Identity) -> ClientRound:
        """The round ``to_bytes`` wrote, at the step it had reached."""
        state = json.loads(raw)
        round_ = cls(int(state["node"]), config, bytes.fromhex(state["context"]), identity)
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
        round_._identities = {int(n): bytes.fromhex(key) for n, key in state["identities"].items()}
        round_._sharers = [int(n) for n in state["sharers"]]
        round_._survivors = [int(n) for n in state["survivors"]]
        round_.threshold = int(state["threshold"])
        round_.agreed_noise = float(state["agreed_noise"])
        return round_

    @property
    def roster_size(self) -> int:
        """The verified institutions of the roster (known from ``share_keys`` on)."""
        return len(self._roster)

    def _advance(self, stage: str) -> None:
        if STAGES[self._stage] != stage:
            raise SecureAggregationError(
                f"secure aggregation: node {self.node} asked to {stage} at stage {STAGES[self._stage]}"
            )
        self._stage += 1

    def advertise_keys(self, noise: float) -> SignedAdvert:
        """Its two public keys and planned noise multiplier, signed over the round and its node id."""
        self._advance("advertise")
        advert = self._own_keys()
        signature = self.identity.sign(advert_message(self.context, self.node, advert, noise))
        return SignedAdvert(advert, noise, self.identity.public, signature)

    def _own_keys(self) -> Advert:
        return Advert(keys.public_bytes(self._cipher_key), keys.public_bytes(self._mask_key))

    def verified(self, roster: Mapping[int, SignedAdvert]) -> dict[int, SignedAdvert]:
        """The roster's entries signed by an identity of this institution's roster, used once, over
        this round's context and their node id; the others left out (its own must be there, unaltered)."""
        uses = Counter(advert.identity for advert in roster.values())
        known = self.identity.roster.names
        kept = {
            node: advert
            for node, advert in roster.items()
            if advert.identity in known
            and uses[advert.identity] == 1
            and verify(
                advert.identity,
                advert.signature,
                advert_message(self.context, node, advert.keys, advert.noise),
            )
        }
        own = kept.get(self.node)
        if own is None or own.keys != self._own_keys() or own.identity != self.identity.public:
            raise SecureAggregationError(
                f"secure aggregation: the roster misstates node {self.node}'s own keys or identity"
            )
        return kept

    def share_keys(self, roster: Mapping[int, SignedAdvert], threshold: int) -> dict[int, bytes]:
        """Sealed shares for each verified peer of the roster, any ``threshold`` of which reconstruct:
        above (roster + tolerated colluders) / 2, else refused. Fewer verified institutions than the threshold
        refuse the round (nothing of this institution's leaves beyond its advert)."""
        self._advance("share")
        check_nodes(list(roster))
        verified = self.verified(roster)
        refused = sorted(set(roster) - set(verified))
        published = [key for advert in verified.values() for key in advert.keys]
        if len(set(published)) != len(published):
            raise SecureAggregationError("secure aggregation: the roster repeats a public key")
        self.config.check_capacity(len(roster))
        configured = self.config.threshold in (None, threshold)
        majority = self.config.majority(threshold, len(roster))
        if not (majority and 2 <= threshold <= len(roster) and configured):
            raise SecureAggregationError(
                f"secure aggregation: threshold {threshold} is no strict majority of the {len(roster)} "
                f"institutions of the roster with {self.config.tolerated_colluders} tolerated colluders, "
                "below 2, or not the configured one"
            )
        if len(verified) < threshold:
            raise RoundDiscarded(
                f"secure aggregation: {len(verified)} of the roster's {len(roster)} institutions carry a "
                f"valid signature of a known identity (refused: nodes {refused}), fewer than the threshold "
                f"{threshold}; nothing is shared"
            )
        self.threshold = threshold
        self._roster = {node: advert.keys for node, advert in verified.items()}
        self._identities = {node: advert.identity for node, advert in verified.items()}
        self.agreed_noise = max(advert.noise for advert in verified.values())
        self.context = agreed_context(self.context, self.agreed_noise)
        key_shares = shamir.split(keys.private_bytes(self._mask_key), self.threshold, self._roster)
        seed_shares = shamir.split(self._seed, self.threshold, self._roster)
        self._shares[self.node] = (key_shares[self.node], seed_shares[self.node])
        return {
            peer: keys.seal(
                self._cipher_key, advert.cipher, self.context, self.node, peer,
                key_shares[peer] + seed_shares[peer],
            )
            for peer, advert in self._roster.items()
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

    def sign_survivors(self, survivors: Sequence[int]) -> bytes:
        """Its signature over the survivor list it was sent (kept: the unmask answers that one only);
        a list without itself, with a peer it was not masked with, or below the threshold refused."""
        self._advance("consistency")
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
        self._survivors = sorted(alive)
        return self.identity.sign(survivors_message(self.context, self._survivors))

    def unmask(self, signatures: Mapping[int, bytes]) -> UnmaskShares:
        """Shares of every survivor's self-mask seed and every dropped sharer's mask key, once, and only
        when at least threshold survivors signed the list this institution signed."""
        self._advance("unmask")
        message = survivors_message(self.context, self._survivors)
        signed = [
            node
            for node, signature in signatures.items()
            if node in self._survivors and verify(self._identities[node], signature, message)
        ]
        if len(signed) < self.threshold:
            raise RoundDiscarded(
                f"secure aggregation: {len(signed)} survivors signed the survivor list node {self.node} was "
                f"sent, fewer than the threshold {self.threshold} (another list was sent to others?); "
                "nothing is unmasked"
            )
        alive = set(self._survivors)
        return UnmaskShares(
            seeds={peer: self._shares[peer][1] for peer in self._sharers if peer in alive},
            keys={peer: self._shares[peer][0] for peer in self._sharers if peer not in alive},
        )
