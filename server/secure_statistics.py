"""Round 0 under secure aggregation (federation.secure_aggregation), the coordinator's side: the
institutions' class statistics summed so that the coordinator learns only the sum.

The protocol's five stages (common.secure_aggregation.server.ServerRound) run as five Grid exchanges of
train messages, each naming its stage (P.SECAGG_STAGE): advertise keys (signed adverts back), share keys
(the roster of signed adverts out, the sealed shares back), masked input (each sharer's inbox and the
global adapter out, the masked vector back), consistency check (the survivors out, each one's signature
over them back), unmask (the signatures out, the shares of seeds and keys back). With
security.identity_roster the coordinator drops adverts of identities not in it before relaying. Each
advert carries its institution's planned noise multiplier and the roster relays them all
(P.SECAGG_NOISES); each institution added only its share of the largest (client.secure_statistics), so
the unmasked sum carries the central noise of the most private institution's plan; the head is built
from it as from the plain summed releases (server.statistics_head). Fewer survivors than the
threshold or than the institutions less the tolerated dropouts discard the round: nothing is unmasked,
one log line, and the run goes on without the statistics head. Per-reply screening cannot look inside a
masked vector: the codec still checks records, stage, fingerprint, shapes and dtypes, and the
quantisation range (common.secure_aggregation.settings.for_statistics) bounds what one institution can add.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from functools import partial

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.common import protocol as P
from fedlora.common.codec import (
    advert_parts,
    parse_advert,
    parse_consistency,
    parse_masked,
    parse_shares,
    parse_unmask,
)
from fedlora.common.config import FedloraConfig
from fedlora.common.errors import AdapterError, RoundDiscarded
from fedlora.common.secure_aggregation import keys, shamir
from fedlora.common.secure_aggregation.identity import load_roster
from fedlora.common.secure_aggregation.quantise import Quantiser, ring_dtype
from fedlora.common.secure_aggregation.server import ServerRound
from fedlora.common.secure_aggregation.settings import for_statistics
from fedlora.server.history import RoundLog
from fedlora.server.screening import drop, failure_reason, first_per_node, speaks_for
from fedlora.server.statistics_head import summed_variance
from fedlora.server.strategy import LoraStrategy

log = logging.getLogger("fedlora.server")
CONTEXT_BYTES = 16
# a sealed pair of Shamir shares: nonce, the two shares, the AEAD tag
SEALED_BYTES = keys.NONCE_BYTES + 2 * shamir.SHARE_BYTES + 16


def as_bytes(raw: bytes) -> Array:
    return Array(np.frombuffer(raw, dtype=np.uint8).copy())


class Exchange:
    """One stage's messages out and the well-formed replies back, by node; anything else dropped.

    The stages share the round's deadline (federation.round_timeout), so round 0 waits no longer
    than any round. A node asked at a stage that does not answer in the time left, or that the
    SuperLink reports unavailable (a killed node, once its heartbeats lapse: the SuperLink answers
    for it, as node 1), is dropped from the stage under its own id and not asked again."""

    def __init__(self, grid: Grid, config: ConfigRecord, timeout: float) -> None:
        self.grid, self.config, self.timeout = grid, config, timeout
        self.deadline = time.monotonic() + timeout
        self.record = RoundLog(round=0)

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
        for msg in first_per_node(replies, 0, self.record.dropped, f"{stage} statistics", node_of):
            node = node_of(msg)
            if node not in nodes:
                drop(self.record.dropped, 0, msg, "not asked at this stage", stage, node)
            elif msg.has_error():
                drop(self.record.dropped, 0, msg, failure_reason(msg.error), stage, node)
            else:
                try:
                    parsed[node] = parse(msg.content)
                except AdapterError as err:
                    drop(self.record.dropped, 0, msg, str(err), stage, node)
        for node in sorted(set(nodes) - {node_of(msg) for msg in replies}):
            log.warning("round 0: node %d sent no %s reply within %.0f s", node, stage, left)
            self.record.dropped.append({"node": node, "reason": f"no {stage} reply within {left:.0f} s"})
        return parsed


def secure_statistics(
    grid: Grid,
    strategy: LoraStrategy,
    arrays: ArrayRecord,
    cfg: FedloraConfig,
    on_sum: Callable[[np.ndarray], None] | None = None,
) -> ArrayRecord | None:
    """The global adapter with the head from the securely summed statistics; None when the round was
    discarded (the head stays as model.head_init made it). ``on_sum`` is handed the unmasked sum (the
    class sums flattened, then the counts), as the coordinator learns it."""
    fed = cfg.federation
    strategy.set_global(arrays)
    fingerprint = strategy.layout.fingerprint
    classes, width = strategy.head_shape()
    length = classes * width + classes
    nodes = strategy.statistics_nodes(grid)
    settings = for_statistics(fed.secagg_threshold, fed.secagg_dropouts, fed.secagg_colluders)
    identities = load_roster(cfg.security.identity_roster) if cfg.security.identity_roster else None
    server = ServerRound(settings, secrets.token_bytes(CONTEXT_BYTES), length, len(nodes), identities)
    config = strategy.statistics_config()
    config.update(
        {
            P.SECAGG_CONTEXT: server.context,
            P.SECAGG_THRESHOLD: server.threshold,
            P.SECAGG_DROPOUTS: fed.secagg_dropouts,
            P.SECAGG_COLLUDERS: fed.secagg_colluders,
        }
    )
    exchange = Exchange(grid, config, fed.round_timeout)
    strategy.rounds.append(exchange.record)
    try:
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
        replies = exchange(
            P.MASKED_INPUT,
            list(inboxes),
            lambda c: parse_masked(c, fingerprint, length, ring_dtype(settings.ring_bits)),
            lambda node: {
                P.ARRAYS: arrays,
                P.SECAGG_INBOX: ArrayRecord({str(s): as_bytes(text) for s, text in inboxes[node].items()}),
            },
        )
        survivors = server.collect_masked({node: vector for node, (vector, _) in replies.items()})
        needed = len(roster) - fed.secagg_dropouts
        if len(survivors) < needed:
            raise RoundDiscarded(
                f"secure aggregation: {len(survivors)} institutions sent masked statistics, fewer than the "
                f"{len(roster)} that advertised keys less {fed.secagg_dropouts} tolerated dropouts; "
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
    except RoundDiscarded as err:
        log.warning("round 0: %s; the run goes on without the statistics head", err)
        return None
    if on_sum is not None:
        on_sum(total)
    record = exchange.record
    noise = [float(replies[n][1].noise_std) for n in survivors]
    record.clients = [
        {"node": n, **{k: float(v) for k, v in replies[n][1].values().items()}} for n in survivors
    ]
    record.aggregation = {
        "secagg_institutions": float(len(roster)),
        "secagg_survivors": float(len(survivors)),
        "secagg_threshold": float(server.threshold),
        "secagg_dropouts": float(fed.secagg_dropouts),
        "secagg_colluders": float(fed.secagg_colluders),
        "secagg_quantisation_error": Quantiser.of(settings).sum_error(len(survivors)),
        # the one total the coordinator reads off the sum: its rows, with the noise the sum carries
        "secagg_rows": float(total[classes * width :].sum()),
    }
    sums = torch.from_numpy(total[: classes * width].reshape(classes, width))
    counts = torch.from_numpy(total[classes * width :])
    log.info("round 0: shared head from the securely summed statistics of %d institutions", len(survivors))
    return strategy.statistics_head(
        sums, counts, summed_variance(noise), cfg.model.head_scale, len(survivors)
    )
