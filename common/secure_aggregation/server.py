"""The coordinator's side of one round, as a state machine: collect keys, route the sealed shares,
collect masked vectors, unmask the survivors' sum.

At every step fewer than the threshold left discards the round (``RoundDiscarded``) and the machine
stays discarded: ``unmask`` is reachable only through a ``collect_masked`` that found enough
survivors, and the survivors themselves refuse a shorter list (client.ClientRound.unmask). A
malformed message counts its sender as dropped; it never stops the round for the others.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np

from fedlora.common.errors import RoundDiscarded, SecureAggregationError
from fedlora.common.secure_aggregation import keys, prg, shamir
from fedlora.common.secure_aggregation.client import check_nodes, pairwise_mask
from fedlora.common.secure_aggregation.messages import Advert, UnmaskShares
from fedlora.common.secure_aggregation.quantise import Quantiser, ring_dtype
from fedlora.common.secure_aggregation.settings import SecAggConfig

STAGES = ("keys", "route", "masked", "unmask", "done")


class ServerRound:
    def __init__(self, config: SecAggConfig, context: bytes, length: int, sampled: int) -> None:
        """A round of ``sampled`` institutions masking vectors of ``length`` values; its threshold
        (``self.threshold``, sent with the roster) is checked against the config here."""
        self.config, self.context, self.length = config, context, length
        self.threshold = config.check_round(sampled)
        self.roster: dict[int, Advert] = {}
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

    def collect_keys(self, adverts: Mapping[int, Advert]) -> dict[int, Advert]:
        """The roster every advertising institution gets: well-formed adverts whose keys no other
        advert repeats (a copied key leaves out both, so a copier cannot push out its victim)."""
        self._advance("keys")
        check_nodes(list(adverts))
        well_formed = {
            node: Advert(*advert)
            for node, advert in adverts.items()
            if isinstance(advert, tuple)
            and len(advert) == 2
            and all(isinstance(key, bytes) and len(key) == keys.PUBLIC_BYTES for key in advert)
        }
        uses = Counter(key for advert in well_formed.values() for key in advert)
        self.roster = {
            node: advert
            for node, advert in sorted(well_formed.items())
            if all(uses[key] == 1 for key in advert)
        }
        self._require(len(self.roster), "advertised keys")
        return dict(self.roster)

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
