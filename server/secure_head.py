"""A head round under secure aggregation (federation.secure_aggregation), the coordinator's side: the
head-gradient sums of the institutions that planned a head round (client.head_rounds), summed so that
the coordinator learns only their sum, which carries the round's agreed noise sigma C once.

The message flow: the round's train message goes to every sampled node as in any round, saying that
head rounds go through a secure sum (P.SECURE_HEAD). An institution that trains LoRA (or none) answers
as in the plain path, with its update and its full local noise; one whose planner planned a head round
answers that it joins (P.JOIN_SECURE_SUM: nothing computed, released or charged). The five stages then
run among those that joined, through the secure sum's driver (server.secure_sum): each advertises its
ledger's noise multiplier, all add shares of the largest, each charges its ledger at the sum's sigma and
at its share alone before its masked vector leaves. The planner decides per institution, so only the
replies tell the coordinator who joins; one exchange more than a plain round is the price. The unmasked
sum is stepped by the strategy as a plain round's summed head replies are (server.head_step, divided by
round 0's released rows), then the configured server optimiser. Too few survivors, or too few joiners
for the protocol's threshold, discard the secure sum: one log line, nothing unmasked, the head not
stepped, the LoRA replies of the round still aggregated, and the federation goes on.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedlora.common import protocol as P
from fedlora.common.config import FederationConfig
from fedlora.common.errors import ConfigError, RoundDiscarded
from fedlora.common.head_gradient import length
from fedlora.common.secure_aggregation.identity import Roster
from fedlora.common.secure_aggregation.server import ServerRound
from fedlora.common.secure_aggregation.settings import for_head_gradient
from fedlora.server.head_step import SecureHead
from fedlora.server.secure_sum import CONTEXT_BYTES, Exchange, secure_sum
from fedlora.server.strategy import LoraStrategy

log = logging.getLogger("fedlora.server")
HeadSumCallback = Callable[[int, np.ndarray], None]
"""Handed a secure head round's number and unmasked sum (the simulation's audit)."""


def secure_head_sum(
    grid: Grid,
    strategy: LoraStrategy,
    arrays: ArrayRecord,
    fed: FederationConfig,
    roster: Roster | None,
    joined: list[int],
    server_round: int,
    on_sum: HeadSumCallback | None = None,
) -> SecureHead:
    """The secure sum of the head gradients of the nodes that ``joined`` round ``server_round``, at the
    global adapter ``arrays``; ``roster``: the federation's identities where the coordinator holds them."""
    classes, width = strategy.head_shape()
    config = strategy.head_sum_config(server_round)
    exchange = Exchange(grid, config, fed.round_timeout, server_round, "head gradient")
    try:
        settings = for_head_gradient(fed.secagg_threshold, fed.secagg_dropouts, fed.secagg_colluders)
        context = secrets.token_bytes(CONTEXT_BYTES)
        server = ServerRound(settings, context, length(classes, width), len(joined), roster)
    except ConfigError as err:
        log.warning(
            "round %d: %d institutions joined the secure head sum: %s; the head is not stepped this round",
            server_round,
            len(joined),
            err,
        )
        return SecureHead(exchange.record, None, 0)
    config.update(
        {
            P.SECAGG_CONTEXT: server.context,
            P.SECAGG_THRESHOLD: server.threshold,
            P.SECAGG_DROPOUTS: fed.secagg_dropouts,
            P.SECAGG_COLLUDERS: fed.secagg_colluders,
        }
    )
    try:
        summed = secure_sum(
            exchange,
            server,
            joined,
            strategy.layout.fingerprint,
            fed.secagg_dropouts,
            lambda _node: {P.ARRAYS: arrays},
            strategy.screen.check_epsilon,
            head=True,
        )
    except RoundDiscarded as err:
        log.warning("round %d: %s; the head is not stepped this round", server_round, err)
        return SecureHead(exchange.record, None, 0)
    if on_sum is not None:
        on_sum(server_round, summed.total)
    record = exchange.record
    record.clients = [
        {"node": n, **{k: float(v) for k, v in summed.metrics[n].values().items()}} for n in summed.survivors
    ]
    record.aggregation = summed.figures(fed.secagg_dropouts, fed.secagg_colluders)
    log.info(
        "round %d: head stepped on the secure sum of %d institutions' head gradients",
        server_round,
        len(summed.survivors),
    )
    return SecureHead(record, torch.from_numpy(summed.total), len(summed.survivors))
