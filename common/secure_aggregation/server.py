"""The coordinator's side of one round, as a state machine: collect the signed keys, route the sealed
shares, collect masked vectors, relay the survivors' signatures over the survivor list (the consistency
check), unmask the survivors' sum.

The institutions verify every advert against their own roster of identities and every survivor list
against its signatures (client.ClientRound); the server checks the same signatures (and, given the
federation's roster, that each identity is in it) only so that one bad advert or signature counts its
sender as dropped instead of making honest institutions refuse the round.

At every step fewer than the threshold left discards the round (``RoundDiscarded``) and the machine
stays discarded: ``unmask`` is reachable only through a ``collect_masked`` that found enough
survivors, and the survivors themselves refuse a shorter list (client.ClientRound.unmask). A
malformed message counts its sender as dropped; it never stops the round for the others.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np

from fedlora.common.distributed_noise import agreed_context
from fedlora.common.errors import RoundDiscarded, SecureAggregationError
from fedlora.common.secure_aggregation import keys, prg, shamir
from fedlora.common.secure_aggregation.client import check_nodes, pairwise_mask
from fedlora.common.secure_aggregation.identity import (
    PUBLIC_BYTES,
    Roster,
    advert_message,
    survivors_message,
    verify,
)
from fedlora.common.secure_aggregation.messages import Advert, SignedAdvert, UnmaskShares
from fedlora.common.secure_aggregation.quantise import Quantiser, ring_dtype
from fedlora.common.secure_aggregation.settings import SecAggConfig

STAGES = ("keys", "route", "masked", "consistency", "unmask", "done")


class ServerRound:
    def __init__(
        self, config: SecAggConfig, context: bytes, length: int, sampled: int, roster: Roster | None = None
    ) -> None:
        """A round of ``sampled`` institutions masking vectors of ``length`` values; its threshold
        (``self.threshold``, sent with the roster) is checked against the config here. ``roster``: the
        federation's identities, where the coordinator has them (else any validly signed advert)."""
        self.config, self.context, self.length, self.identities = config, context, length, roster
        self.threshold = config.check_round(sampled)
        self.noise = 0.0
        self.roster: dict[int, Advert] = {}
        self.signed: dict[int, SignedAdvert] = {}
        self.sharers: list[int] = []
        self.survivors: list[int] = []
        self._masked: dict[int, np.ndarray] = {}
        self._stage = 0

    @property
    def discarded(self) -> bool:
        return self._stage < 0

    def _advance(self, stage: str) -> None:
        if self.discarded:
            raise RoundDiscarded("secure aggregation: the round was discarded; nothing is unmasked")
        if STAGES[self._stage] != stage:
            raise SecureAggregationError(
                f"secure aggregation: server asked to {stage} at stage {STAGES[self._stage]}"
            )
        self._stage += 1

    def _require(self, count: int, what: str) -> None:
        if count < self.threshold:
            self._stage = -1
            raise RoundDiscarded(
                f"secure aggregation: {count} institutions {what}, fewer than the threshold "
                f"{self.threshold}; "
                "the round is discarded and nothing is unmasked"
            )

    def collect_keys(self, adverts: Mapping[int, SignedAdvert]) -> dict[int, SignedAdvert]:
        """The roster every advertising institution gets: well-formed adverts signed by their identity
        (one of the federation's, where the server has its roster) whose keys and identity no other
        advert repeats (a copy leaves out both, so a copier cannot push out its victim). The round's
        noise is the largest multiplier of the roster, bound into its context."""
        self._advance("keys")
        check_nodes(list(adverts))
        well_formed = {
            node: advert
            for node, advert in adverts.items()
            if isinstance(advert, SignedAdvert) and self._signed(node, advert)
        }
        uses = Counter(key for advert in well_formed.values() for key in (*advert.keys, advert.identity))
        self.signed = {
            node: advert
            for node, advert in sorted(well_formed.items())
            if all(uses[key] == 1 for key in (*advert.keys, advert.identity))
        }
        self.roster = {node: advert.keys for node, advert in self.signed.items()}
        self._require(len(self.roster), "advertised keys")
        self.noise = max(advert.noise for advert in self.signed.values())
        self.context = agreed_context(self.context, self.noise)
        return dict(self.signed)

    def _signed(self, node: int, advert: SignedAdvert) -> bool:
        keys_ = advert.keys
        return (
            isinstance(keys_, tuple)
            and len(keys_) == 2
            and all(isinstance(key, bytes) and len(key) == keys.PUBLIC_BYTES for key in keys_)
            and isinstance(advert.identity, bytes)
            and len(advert.identity) == PUBLIC_BYTES
            and (self.identities is None or advert.identity in self.identities.names)
            and isinstance(advert.signature, bytes)
            and isinstance(advert.noise, float)
            and verify(
                advert.identity, advert.signature, advert_message(self.context, node, keys_, advert.noise)
            )
        )

    def route_shares(self, sent: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Each sharer's inbox: the ciphertexts every other sharer sealed to it."""
        self._advance("route")
        self.sharers = sorted(
            node
            for node, sealed in sent.items()
            if node in self.roster
            and set(sealed) == set(self.roster) - {node}
            and all(isinstance(text, bytes) for text in sealed.values())
        )
        self._require(len(self.sharers), "shared keys")
        return {
            receiver: {sender: sent[sender][receiver] for sender in self.sharers if sender != receiver}
            for receiver in self.sharers
        }

    def collect_masked(self, masked: Mapping[int, np.ndarray]) -> list[int]:
        """The survivors (sharers whose masked vector is well-formed), sent to each of them."""
        self._advance("masked")
        dtype = ring_dtype(self.config.ring_bits)
        self._masked = {
            node: vector
            for node, vector in masked.items()
            if node in self.sharers and isinstance(vector, np.ndarray) and vector.dtype == dtype
            and vector.shape == (self.length,)
        }  # fmt: skip
        self.survivors = sorted(self._masked)
        self._require(len(self.survivors), "sent masked vectors")
        return list(self.survivors)

    def collect_signatures(self, signatures: Mapping[int, bytes]) -> dict[int, bytes]:
        """The survivors' valid signatures over the survivor list, relayed to each of them: every
        survivor answers the unmask only with threshold of them over the list it signed."""
        self._advance("consistency")
        message = survivors_message(self.context, self.survivors)
        kept = {
            node: signature
            for node, signature in sorted(signatures.items())
            if node in self.survivors
            and isinstance(signature, bytes)
            and verify(self.signed[node].identity, signature, message)
        }
        self._require(len(kept), "signed the survivor list")
        return kept

    def unmask(self, answers: Mapping[int, UnmaskShares]) -> np.ndarray:
        """The ring sum of the survivors' quantised vectors: each survivor's self-mask rebuilt from
        shares of its seed, each dropped sharer's pairwise masks from shares of its key."""
        self._advance("unmask")
        answers = {node: answer for node, answer in answers.items() if self._well_formed(node, answer)}
        self._require(len(answers), "answered the unmasking")
        bits = self.config.ring_bits
        total = np.zeros(self.length, dtype=ring_dtype(bits))
        for vector in self._masked.values():
            total += vector
        for node in self.survivors:
            seed = shamir.combine(self._shares_of(answers, node, "seeds"), self.threshold)
            total -= prg.expand(seed, self.length, bits)
        for dropped in sorted(set(self.sharers) - set(self.survivors)):
            raw = shamir.combine(self._shares_of(answers, dropped, "keys"), self.threshold)
            key = keys.private_key(raw)
            if keys.public_bytes(key) != self.roster[dropped].mask:
                raise SecureAggregationError(
                    f"secure aggregation: the shares of node {dropped}'s key do not match it"
                )
            for node in self.survivors:
                seed = keys.mask_seed(key, self.roster[node].mask, self.context)
                total -= pairwise_mask(node, dropped, seed, self.length, bits)
        return total

    def _well_formed(self, node: int, answer: UnmaskShares) -> bool:
        """A survivor's answer with one share of each survivor's seed and each dropped sharer's key."""
        dropped = set(self.sharers) - set(self.survivors)
        return (
            node in self.survivors
            and isinstance(answer, UnmaskShares)
            and set(answer.seeds) == set(self.survivors)
            and set(answer.keys) == dropped
            and all(
                isinstance(share, bytes) and len(share) == shamir.SHARE_BYTES
                for share in (*answer.seeds.values(), *answer.keys.values())
            )
        )

    def _shares_of(self, answers: Mapping[int, UnmaskShares], node: int, kind: str) -> dict[int, bytes]:
        return {holder: getattr(answer, kind)[node] for holder, answer in answers.items()}

    def aggregate(self, answers: Mapping[int, UnmaskShares]) -> np.ndarray:
        """The float sum of the survivors' clipped vectors (``unmask``, dequantised)."""
        return Quantiser.of(self.config).dequantise_sum(self.unmask(answers), len(self.survivors))
