"""Round 0 under secure aggregation (federation.secure_aggregation), the coordinator's side: the
institutions' class statistics summed so that the coordinator learns only the sum.

The protocol's five stages run through the secure sum's driver (server.secure_sum): advertise keys (signed
adverts back), share keys, masked input (the global adapter out with each sharer's inbox, the masked
statistics back), consistency check, unmask.
Each advert carries its institution's planned noise multiplier and the roster relays them all
(P.SECAGG_NOISES); each institution added only its share of the largest (client.secure_statistics), so
the unmasked sum carries the central noise of the most private institution's plan; the head is
built from it as from the plain summed releases (server.statistics_head). Fewer survivors than the
threshold or than the institutions less the tolerated dropouts discard the round: nothing is unmasked,
one log line, and the run goes on without the statistics head. Per-reply screening cannot look inside a
masked vector: the codec still checks records, stage, fingerprint, shapes and dtypes, and the
quantisation range (common.secure_aggregation.settings.for_statistics) bounds what one institution can add.
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
from fedlora.common.config import FedloraConfig
from fedlora.common.errors import RoundDiscarded
from fedlora.common.secure_aggregation.identity import load_roster
from fedlora.common.secure_aggregation.server import ServerRound
from fedlora.common.secure_aggregation.settings import for_statistics
from fedlora.server.secure_sum import CONTEXT_BYTES, Exchange, secure_sum
from fedlora.server.statistics_head import summed_variance
from fedlora.server.strategy import LoraStrategy

log = logging.getLogger("fedlora.server")


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
        summed = secure_sum(
            exchange,
            server,
            nodes,
            fingerprint,
            fed.secagg_dropouts,
            lambda _node: {P.ARRAYS: arrays},
            strategy.screen.check_epsilon,
        )
    except RoundDiscarded as err:
        log.warning("round 0: %s; the run goes on without the statistics head", err)
        return None
    total, survivors = summed.total, summed.survivors
    if on_sum is not None:
        on_sum(total)
    record = exchange.record
    noise = [float(summed.metrics[n].noise_std) for n in survivors]
    record.clients = [
        {"node": n, **{k: float(v) for k, v in summed.metrics[n].values().items()}} for n in survivors
    ]
    record.aggregation = {
        **summed.figures(fed.secagg_dropouts, fed.secagg_colluders),
        # the one total the coordinator reads off the sum: its rows, with the noise the sum carries
        "secagg_rows": float(total[classes * width :].sum()),
    }
    sums = torch.from_numpy(total[: classes * width].reshape(classes, width))
    counts = torch.from_numpy(total[classes * width :])
    log.info("round 0: shared head from the securely summed statistics of %d institutions", len(survivors))
    return strategy.statistics_head(
        sums, counts, summed_variance(noise), cfg.model.head_scale, len(survivors)
    )
