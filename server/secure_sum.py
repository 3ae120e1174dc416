"""The secure sum, the coordinator's side: one run of the protocol's five stages over the Grid, for any
vector the institutions release under secure aggregation (round 0's class statistics,
server.secure_statistics; a head round's gradient sums, server.secure_head).

Each stage is a Grid exchange of train messages naming it (P.SECAGG_STAGE), driven through
common.secure_aggregation.server.ServerRound: advertise keys (each advert carries its institution's
planned noise multiplier, signed by its long-term identity), share keys (the roster of signed adverts
and every advertised multiplier out, the sealed shares back; the largest multiplier is bound into the
round's context, common.distributed_noise.agreed_context), masked input (each sharer's inbox and the
caller's records out, the masked vector back), consistency check (the survivors out, each one's
signature over them back), unmask (the signatures out, the shares of seeds and keys back). With
security.identity_roster the coordinator drops adverts of identities not in it before relaying.
Fewer survivors than the threshold or than the
institutions less the tolerated dropouts discard the round (RoundDiscarded): nothing is unmasked.
Per-reply screening cannot look inside a masked vector: the codec still checks records, stage,
fingerprint, shapes and dtypes, and the quantisation range bounds what one institution can add.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.common import protocol as P
from fedlora.common.codec import (
    HeadMetrics,
    TrainMetrics,
    advert_parts,
    parse_advert,
    parse_consistency,
    parse_masked,
    parse_shares,
    parse_unmask,
)
from fedlora.common.errors import AdapterError, RoundDiscarded
from fedlora.common.secure_aggregation import keys, shamir
from fedlora.common.secure_aggregation.quantise import Quantiser, ring_dtype
from fedlora.common.secure_aggregation.server import ServerRound
from fedlora.server.history import RoundLog
from fedlora.server.screening import drop, failure_reason, first_per_node, speaks_for

log = logging.getLogger("fedlora.server")
CONTEXT_BYTES = 16
# a sealed pair of Shamir shares: nonce, the two shares, the AEAD tag
SEALED_BYTES = keys.NONCE_BYTES + 2 * shamir.SHARE_BYTES + 16


def as_bytes(raw: bytes) -> Array:
    return Array(np.frombuffer(raw, dtype=np.uint8).copy())


class Exchange:
    """One stage's messages out and the well-formed replies back, by node; anything else dropped.

    The five stages share the round's deadline (federation.round_timeout), so a secure sum waits no
    longer than any round. A node asked at a stage that does not answer in the time left, or that the
    SuperLink reports unavailable (a killed node, once its heartbeats lapse: the SuperLink answers
    for it, as node 1), is dropped from the stage under its own id and not asked again. ``what`` names
    the release in the round's log (round 0's statistics, a round's head gradient)."""

    def __init__(
        self,
        grid: Grid,
        config: ConfigRecord,
        timeout: float,
        server_round: int = 0,
        what: str = "statistics",
    ) -> None:
        self.grid, self.config, self.timeout = grid, config, timeout
        self.server_round, self.what = server_round, what
        self.deadline = time.monotonic() + timeout
        self.record = RoundLog(round=server_round)

    def __call__(
        self,
        stage: str,
        nodes: list[int],
        parse: Callable[[RecordDict], object],
        records: Callable[[int], Mapping[str, ArrayRecord | ConfigRecord]] = lambda _node: {},
        extra: Mapping[str, object] | None = None,
    ) -> dict[int, object]:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RoundDiscarded(
                f"secure aggregation: federation.round_timeout ({self.timeout:g} s) ran out before the "
                f"{stage} stage; nothing is unmasked"
            )
        messages = []
        for node in nodes:
            config = ConfigRecord({**dict(self.config), P.SECAGG_STAGE: stage, **(extra or {})})
            msg = Message(
                content=RecordDict({P.CONFIG: config, **records(node)}),
                message_type=MessageType.TRAIN,
                dst_node_id=node,
            )
            msg.metadata.ttl = left
            messages.append(msg)
        replies = list(self.grid.send_and_receive(messages, timeout=left))
        asked = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in messages}
        node_of = partial(speaks_for, asked=asked)
        parsed: dict[int, object] = {}
        at = self.server_round
        kind = f"{stage} {self.what}"
        for msg in first_per_node(replies, at, self.record.dropped, kind, node_of):
            node = node_of(msg)
            if node not in nodes:
                drop(self.record.dropped, at, msg, "not asked at this stage", stage, node)
            elif msg.has_error():
                drop(self.record.dropped, at, msg, failure_reason(msg.error), stage, node)
            else:
                try:
                    parsed[node] = parse(msg.content)
                except AdapterError as err:
                    drop(self.record.dropped, at, msg, str(err), stage, node)
        for node in sorted(set(nodes) - {node_of(msg) for msg in replies}):
            log.warning("round %d: node %d sent no %s reply within %.0f s", at, node, stage, left)
            self.record.dropped.append({"node": node, "reason": f"no {stage} reply within {left:.0f} s"})
        return parsed


@dataclass(frozen=True)
class SecureSum:
    """What the coordinator learns from one secure sum: the unmasked float sum of the survivors'
    vectors, who they are, each one's masked reply's metrics, and the protocol's figures."""

    total: np.ndarray
    survivors: list[int]
    metrics: dict[int, TrainMetrics | HeadMetrics]
    roster: int
    threshold: int
    quantisation_error: float

    def figures(self, dropouts: int, colluders: int) -> dict[str, float]:
        """The round's ``secagg_*`` aggregation figures (history.json; the model card reads them)."""
        return {
            "secagg_institutions": float(self.roster),
            "secagg_survivors": float(len(self.survivors)),
            "secagg_threshold": float(self.threshold),
            "secagg_dropouts": float(dropouts),
            "secagg_colluders": float(colluders),
            "secagg_quantisation_error": self.quantisation_error,
        }


def secure_sum(
    exchange: Exchange,
    server: ServerRound,
    nodes: list[int],
    fingerprint: str,
    dropouts: int,
    masked_records: Callable[[int], Mapping[str, ArrayRecord | ConfigRecord]],
    check_epsilon: Callable[[int, float], None],
    head: bool = False,
) -> SecureSum:
    """The five stages among ``nodes``; ``masked_records``: what the masked-input message carries to a
    node beside its inbox (what it needs to compute its release); ``head``: the masked replies are head
    gradients (their metrics carry no row count); ``check_epsilon``: the reply screen's memory of each
    node's cumulative epsilon (server.screening.ReplyScreen.check_epsilon), AdapterError where it went
    down (a lost or reset ledger): that node's masked vector is left out as a dropout's, its self-mask
    never asked for. RoundDiscarded, nothing unmasked, where too few institutions survive a stage or
    fewer than the roster less ``dropouts`` sent a masked vector."""
    adverts = exchange(P.ADVERTISE_KEYS, nodes, lambda c: parse_advert(c, fingerprint))
    roster = server.collect_keys(adverts)
    noises = ConfigRecord({str(node): advert.noise for node, advert in roster.items()})
    keys_out = ArrayRecord(
        {
            f"{node}/{name}": as_bytes(raw)
            for node, advert in roster.items()
            for name, raw in advert_parts(advert).items()
        }
    )
    sent = exchange(
        P.SHARE_KEYS,
        list(roster),
        lambda c: parse_shares(c, fingerprint, SEALED_BYTES),
        lambda _node: {P.SECAGG_ROSTER: keys_out, P.SECAGG_NOISES: noises},
    )
    inboxes = server.route_shares(sent)
    dtype = ring_dtype(server.config.ring_bits)
    replies = exchange(
        P.MASKED_INPUT,
        list(inboxes),
        lambda c: parse_masked(c, fingerprint, server.length, dtype, head),
        lambda node: {
            **masked_records(node),
            P.SECAGG_INBOX: ArrayRecord({str(s): as_bytes(text) for s, text in inboxes[node].items()}),
        },
    )
    for node in sorted(replies):
        try:
            check_epsilon(node, replies[node][1].epsilon)
        except AdapterError as err:
            at, what = exchange.server_round, exchange.what
            log.warning("round %d: node %d's masked %s refused: %s", at, node, what, err)
            exchange.record.dropped.append({"node": node, "reason": str(err)})
            del replies[node]
    survivors = server.collect_masked({node: vector for node, (vector, _) in replies.items()})
    needed = len(roster) - dropouts
    if len(survivors) < needed:
        raise RoundDiscarded(
            f"secure aggregation: {len(survivors)} institutions sent masked {exchange.what}, fewer than the "
            f"{len(roster)} that advertised keys less {dropouts} tolerated dropouts; "
            "the round is discarded and nothing is unmasked"
        )
    signatures = exchange(
        P.CONSISTENCY,
        survivors,
        lambda c: parse_consistency(c, fingerprint),
        extra={P.SECAGG_SURVIVORS: [str(n) for n in survivors]},
    )
    signed = server.collect_signatures(signatures)
    relayed = ArrayRecord({str(node): as_bytes(signature) for node, signature in signed.items()})
    answers = exchange(
        P.UNMASK,
        list(signed),
        lambda c: parse_unmask(c, fingerprint, shamir.SHARE_BYTES),
        lambda _node: {P.SECAGG_SIGNATURES: relayed},
    )
    total = server.aggregate(answers)
    return SecureSum(
        total=total,
        survivors=survivors,
        metrics={n: replies[n][1] for n in survivors},
        roster=len(roster),
        threshold=server.threshold,
        quantisation_error=Quantiser.of(server.config).sum_error(len(survivors)),
    )
