"""The server's side of a round, composed of small parts behind Flower's public `Strategy` interface.

`LoraStrategy` samples nodes and sends each the global adapter at its own layout; back, it hands
every reply to the `ReplyScreen` (server.screening), weighs what passed with bounded example counts,
lets the `Aggregator` (server.aggregators) combine it, and the `ServerOptimiser` (server.optimisers)
take the step to the next global adapter. `build_strategy` builds these parts from the config.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.common import protocol as P
from fedlora.common.adapter import from_record, to_record
from fedlora.common.catalogue import AGGREGATORS as AGGREGATOR_ENTRIES
from fedlora.common.codec import HeadReply, is_head_gradient, is_join, parse_join, parse_statistics_reply
from fedlora.common.config import FedloraConfig
from fedlora.common.errors import AdapterError, CheckpointError, FedloraError
from fedlora.common.head_gradient import LEARNING_RATE, length
from fedlora.common.model import HEAD, lora_scale
from fedlora.server.aggregators import Aggregator, bounded_weights, create_aggregator
from fedlora.server.global_adapter import GlobalAdapter, Layout
from fedlora.server.head_step import SecureHead, head_step, rows_in_sum, summed_gradient
from fedlora.server.history import RoundLog
from fedlora.server.optimisers import ServerOptimiser, create_optimiser
from fedlora.server.screening import (
    NormBounds,
    ReplyScreen,
    by_node,
    drop,
    failure_reason,
    first_per_node,
    speaks_for,
)
from fedlora.server.statistics_head import class_mean_head, summed, summed_variance

log = logging.getLogger("fedlora.server")
NODE_POLL_SECONDS = 1.0
LAYOUT = "node_layout"  # state_tensors' group of node -> (rank, scale)
AGGREGATOR = "aggregator"  # state_tensors' group of the aggregator's own state
EPSILONS = "node_epsilon"  # state_tensors' group of node -> largest reported cumulative epsilon
RELEASED = "released"  # state_tensors' group of round 0's summed counts ("rows") and releases ("by")


@dataclass(frozen=True)
class Sampling:
    """Which nodes a round asks, and how long it waits for them and for their replies."""

    fraction_train: float
    fraction_evaluate: float
    min_nodes: int
    """What a LoRA round needs: min_clients, less the dropouts a secure round 0 tolerated (the
    federation goes on after losing them)."""
    min_statistics_nodes: int
    """What round 0 needs: min_clients."""
    node_wait_timeout: float
    round_timeout: float


@dataclass(frozen=True)
class Weighting:
    """How much a reply's claimed example count may weigh (a claim cannot be checked)."""

    max_examples: int | None
    max_share: float

    def __call__(self, claims: Sequence[float]) -> list[float]:
        return bounded_weights(claims, self.max_examples, self.max_share)


class LoraStrategy(Strategy):
    """One federation's rounds: ``server_round`` is always the federation's absolute round."""

    def __init__(
        self,
        *,
        layout: Layout,
        sampling: Sampling,
        screen: ReplyScreen,
        weighting: Weighting,
        aggregator: Aggregator,
        optimiser: ServerOptimiser,
        wire_dtype: str = "fp32",
        secure_heads: bool = False,
    ) -> None:
        self.layout, self.sampling, self.screen = layout, sampling, screen
        self.weighting, self.aggregator, self.optimiser = weighting, aggregator, optimiser
        self.wire_dtype = wire_dtype
        self.secure_heads = secure_heads
        """federation.secure_aggregation: head rounds' gradients go through a secure sum
        (server.secure_head)."""
        self.global_adapter = GlobalAdapter({}, aggregator, layout)
        self.sent: dict[str, np.ndarray] = {}
        self.outbox: list[Message] = []
        """The messages of the last configure_train / configure_evaluate, to name who a reply is about."""
        """The adapter the current round's training started from, as sent: the optimiser's origin."""
        self.node_layouts: dict[int, tuple[int, float]] = {}
        """Each node's rank and scale, from its last accepted reply: what it is sent next."""
        self.rounds: list[RoundLog] = []
        self.released: tuple[float, int] | None = None
        """Round 0's released rows (its summed noisy counts) and how many institutions released them:
        what a head round's gradient sum is divided by (server.head_step); None before round 0."""

    def summary(self) -> None:
        log.info(
            "strategy: aggregator %s, server optimiser %s, %d nodes at least",
            self.aggregator.name,
            self.optimiser.name,
            self.sampling.min_nodes,
        )

    # --- to the nodes ---

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.set_global(arrays)
        self.sent = {k: array.numpy() for k, array in arrays.items()}
        config = self._round_config(server_round, config)
        config.update(self.optimiser.train_config())
        if self.secure_heads:
            config[P.SECURE_HEAD] = True
        nodes = self._sample(grid, self.sampling.fraction_train, server_round)
        self.outbox = self._messages(nodes, arrays, config, MessageType.TRAIN)
        return self.outbox

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.set_global(arrays)
        nodes = self._sample(grid, self.sampling.fraction_evaluate, server_round)
        config = self._round_config(server_round, config)
        self.outbox = self._messages(nodes, arrays, config, MessageType.EVALUATE)
        return self.outbox

    def speaks_for(self) -> Callable[[Message], int]:
        """The node each reply of this exchange is about: the SuperLink answers for a node it found
        unavailable as node 1, in reply to the message sent to that node (screening.speaks_for);
        message ids are the grid's, given when it pushed ``outbox``."""
        asked = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in self.outbox}
        return partial(speaks_for, asked=asked)

    def set_global(self, arrays: ArrayRecord) -> None:
        self.global_adapter = GlobalAdapter(from_record(arrays), self.aggregator, self.layout)

    def _round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        config[P.ROUND] = server_round
        config[P.FINGERPRINT] = self.layout.fingerprint
        config[P.LORA_R] = self.layout.lora_r
        config[P.LORA_SCALE] = self.layout.lora_scale
        config[P.WIRE_DTYPE] = self.wire_dtype
        return config

    def _sample(self, grid: Grid, fraction: float, server_round: int) -> list[int]:
        """``fraction`` of the connected nodes, at least ``min_nodes`` (round 0:
        ``min_statistics_nodes``), as Flower's FedAvg samples; but waiting at most node_wait_timeout
        (Flower waits forever), then stopping the run with a clear error (the last complete round
        stays checkpointed)."""
        if not fraction:
            return []
        needed = self.sampling.min_nodes if server_round else self.sampling.min_statistics_nodes
        wait = self.sampling.node_wait_timeout
        deadline = time.monotonic() + wait
        while len(nodes := list(grid.get_node_ids())) < needed:
            if time.monotonic() >= deadline:
                raise FedloraError(
                    f"round {server_round}: only {len(nodes)} of the {needed} nodes needed connected "
                    f"within federation.node_wait_timeout ({wait:g} s); the run stops, its last complete "
                    "round checkpointed: start the server again to resume"
                )
            time.sleep(NODE_POLL_SECONDS)
        return random.sample(nodes, max(int(len(nodes) * fraction), needed))

    def _messages(
        self, nodes: Sequence[int], arrays: ArrayRecord, config: ConfigRecord, kind: str
    ) -> list[Message]:
        """One message per node, expiring with the round (the SuperLink then refuses a late reply
        instead of keeping it for Flower's default 12 h). A node whose rank or scale differs from the
        global one (known from its earlier replies) receives the global adapter at its own layout;
        below the global rank, also what the truncation drops (P.FOLD), so that it can still train on
        the whole global model."""
        shared = RecordDict({P.ARRAYS: arrays, P.CONFIG: config})
        messages = []
        for node in nodes:
            content = shared
            layout = self.node_layouts.get(node)
            if layout is not None and layout != (self.layout.lora_r, self.layout.lora_scale):
                rank, scale = layout
                own = ConfigRecord(dict(config))
                own[P.LORA_R], own[P.LORA_SCALE] = rank, scale
                content = RecordDict(
                    {P.ARRAYS: to_record(self.global_adapter.own(rank, scale)), P.CONFIG: own}
                )
                if rank < self.layout.lora_r:
                    content[P.FOLD] = to_record(self.global_adapter.fold(rank, scale))
            msg = Message(content=content, message_type=kind, dst_node_id=node)
            msg.metadata.ttl = self.sampling.round_timeout
            messages.append(msg)
        return messages

    # --- round 0, statistics first (server.statistics_head) ---

    def configure_statistics(self, arrays: ArrayRecord, grid: Grid) -> list[Message]:
        """A train message asking every connected node for its class statistics (P.STAGE)."""
        self.set_global(arrays)
        config = self.statistics_config()
        return self._messages(self.statistics_nodes(grid), arrays, config, MessageType.TRAIN)

    def statistics_config(self) -> ConfigRecord:
        """The config of a round-0 statistics message."""
        return self._round_config(0, ConfigRecord({P.STAGE: P.STATISTICS}))

    def aggregate_statistics(self, replies: Iterable[Message], head_scale: float) -> ArrayRecord | None:
        """The global adapter with the head built from the sum of every usable release; None when no
        reply was usable (the head stays as model.head_init made it)."""
        record = RoundLog(round=0)
        self.rounds.append(record)
        classes, width = self.head_shape()
        releases, noise = [], []
        for msg in by_node(replies):
            if msg.has_error():
                drop(record.dropped, 0, msg, failure_reason(msg.error), "statistics")
                continue
            try:
                reply = parse_statistics_reply(msg.content, self.layout.fingerprint, classes, width)
            except AdapterError as err:
                drop(record.dropped, 0, msg, str(err), "statistics")
                continue
            releases.append((reply.sums, reply.counts))
            noise.append(float(reply.metrics.noise_std))
            values = {k: float(v) for k, v in reply.metrics.values().items()}
            record.clients.append({"node": msg.metadata.src_node_id, **values})
        if not releases:
            log.warning("round 0: no usable statistics; the head stays as model.head_init made it")
            return None
        log.info("round 0: shared head from the summed statistics of %d institutions", len(releases))
        return self.statistics_head(*summed(releases), summed_variance(noise), head_scale, len(releases))

    def _head_keys(self) -> tuple[str, str]:
        state = self.global_adapter.state
        weight_key = next(k for k in state if f".{HEAD}." in k and k.endswith(".weight"))
        bias_key = next(k for k in state if f".{HEAD}." in k and k.endswith(".bias"))
        return weight_key, bias_key

    def head_shape(self) -> tuple[int, int]:
        """The classification head's classes and width: the shape of the released class sums."""
        classes, width = self.global_adapter.state[self._head_keys()[0]].shape
        return classes, width

    def statistics_head(
        self, sums: torch.Tensor, counts: torch.Tensor, noise_var: float, head_scale: float, institutions: int
    ) -> ArrayRecord:
        """The global adapter with the head built from the federation's summed class statistics of
        ``institutions``, whose per-value noise variance is ``noise_var`` (server.statistics_head);
        their summed counts are kept for the head rounds."""
        self.released = (float(counts.to(torch.float64).clamp(min=0).sum()), institutions)
        state = self.global_adapter.state
        weight_key, bias_key = self._head_keys()
        weight, bias = class_mean_head(sums, counts, head_scale, state[weight_key], noise_var)
        head = {weight_key: weight, bias_key: bias}
        return ArrayRecord({k: Array(np.ascontiguousarray(head.get(k, v).numpy())) for k, v in state.items()})

    def head_sum_config(self, server_round: int) -> ConfigRecord:
        """The config of a secure head sum's stage messages (server.secure_head)."""
        return self._round_config(server_round, ConfigRecord({P.STAGE: P.HEAD_GRADIENT}))

    def joined(self, replies: Iterable[Message], server_round: int) -> list[int]:
        """The nodes whose reply to this round's train message joins its secure head sum (well-formed, one
        per node, in node order); aggregate_train drops the others with their reason."""
        node_of = self.speaks_for()
        nodes = []
        for msg in first_per_node(replies, server_round, [], "join", node_of):
            if not msg.has_error() and is_join(msg.content) and self._join_refused(msg) is None:
                nodes.append(node_of(msg))
        return nodes

    def _join_refused(self, msg: Message) -> str | None:
        """Why a join reply is refused (None: it is not)."""
        if self.released is None:
            return "joins a secure head sum, but no round-0 statistics counted the rows it sums"
        try:
            parse_join(msg.content, self.layout.fingerprint)
        except AdapterError as err:
            return str(err)
        return None

    def statistics_nodes(self, grid: Grid) -> list[int]:
        """Every connected node, at least min_statistics_nodes (waiting for them as a round does)."""
        return self._sample(grid, 1.0, 0)

    # --- from the nodes ---

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message], secured: SecureHead | None = None
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, weigh, aggregate, step; None when no reply was usable (the global stays).
        ``secured``: the round's secure head sum (server.secure_head), stepped as summed head replies."""
        record = RoundLog(round=server_round)
        self.rounds.append(record)
        node_of = self.speaks_for()
        replies = first_per_node(replies, server_round, record.dropped, "train", node_of)
        joins = [m for m in replies if not m.has_error() and is_join(m.content)]
        heads = [m for m in replies if not m.has_error() and is_head_gradient(m.content)]
        others = [m for m in replies if m.has_error() or not is_head_gradient(m.content)]
        others = [m for m in others if m.has_error() or not is_join(m.content)]
        dropped = record.dropped
        for msg in joins:
            if (reason := self._join_refused(msg)) is not None:
                drop(dropped, server_round, msg, reason, "join", node_of(msg))
        accepted = self.screen.train_replies(others, self.global_adapter, server_round, dropped, node_of)
        gradients = self._head_replies(heads, server_round, record.dropped)
        secure = secured if secured is not None and secured.total is not None else None
        if secured is not None:
            record.dropped += secured.record.dropped
        # A reply of no steps is an institution whose planner found DP-SGD would add nothing
        # (client.recipe): its empty update is not averaged in, or it would shrink the others'.
        trained = [s for s in accepted if s.metrics.steps > 0]
        record.statistics_only = len(accepted) - len(trained)
        record.no_training = [s.update.node_id for s in accepted if s.plan == P.STATISTICS_ONLY]
        record.head_gradients = len(gradients) + (secure.survivors if secure is not None else 0)
        if not trained and not gradients and secure is None:
            if accepted:
                log.info("round %d: every reply planned no LoRA steps; the global stays", server_round)
            else:
                log.warning("round %d: no usable reply; the global adapter stays as it was", server_round)
            return None, None
        merged = dict(self.global_adapter.state)
        weights = self.weighting([s.metrics.num_examples for s in trained]) if trained else []
        if trained:
            record.clients = [s.entry(w / sum(weights)) for s, w in zip(trained, weights, strict=True)]
            self.node_layouts.update(
                {s.update.node_id: (s.metrics.lora_r, s.metrics.lora_scale) for s in trained}
            )
            updates = [replace(s.update, num_examples=w) for s, w in zip(trained, weights, strict=True)]
            result = self.aggregator.aggregate(self.global_adapter.state, updates)
            record.aggregation = result.metrics
            merged.update(result.state)
        head_metrics = [reply.metrics.values() for _, reply in gradients]
        if gradients:
            total = summed_gradient([reply.vector for _, reply in gradients])
            merged.update(self._head_step(merged, total, len(gradients)))
            record.clients += [
                {"node": node, **{k: float(v) for k, v in reply.metrics.values().items()}}
                for node, reply in gradients
            ]
        if secure is not None:
            merged.update(self._head_step(merged, secure.total, secure.survivors))
            record.clients += secure.record.clients
            record.aggregation.update(secure.record.aggregation)
            head_metrics += [{k: v for k, v in c.items() if k != "node"} for c in secure.record.clients]
        aggregated = {k: v.to(torch.float32).contiguous().numpy() for k, v in merged.items()}
        stepped = self.optimiser.step(self.sent, aggregated, server_round)
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in stepped.items()})
        metrics = [s.metrics.values() for s in trained] + head_metrics
        return arrays, summarise_metrics(metrics, [*weights, *[1.0] * len(head_metrics)])

    def _head_replies(
        self, replies: Sequence[Message], server_round: int, dropped: list[dict]
    ) -> list[tuple[int, HeadReply]]:
        """The usable head-round replies; all dropped, with the reason, before round 0 released counts."""
        if self.released is None:
            for msg in replies:
                reason = "a head-gradient reply, but no round-0 statistics counted the rows it sums"
                drop(dropped, server_round, msg, reason, "head-gradient")
            return []
        classes, width = self.head_shape()
        return self.screen.head_replies(replies, length(classes, width), server_round, dropped)

    def _head_step(
        self, state: Mapping[str, torch.Tensor], total: torch.Tensor, institutions: int
    ) -> dict[str, torch.Tensor]:
        """The head after one SGD step on the summed gradient of ``institutions`` (plain replies' or a
        secure sum's) over the rows they stand for (server.head_step)."""
        released_rows, released_by = self.released
        rows = rows_in_sum(released_rows, released_by, institutions)
        weight_key, bias_key = self._head_keys()
        weight, bias = head_step(state[weight_key], state[bias_key], total, rows, LEARNING_RATE)
        return {weight_key: weight, bias_key: bias}

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Client evaluation metrics through the codec: a malformed reply is dropped, not fatal."""
        this_round = self.rounds[-1] if self.rounds and self.rounds[-1].round == server_round else None
        dropped = this_round.evaluate_dropped if this_round is not None else []
        parsed = self.screen.evaluate_replies(replies, server_round, dropped, self.speaks_for())
        if not parsed:
            return None
        weights = self.weighting([m.num_examples for m in parsed])
        return summarise_metrics([m.values() for m in parsed], weights)

    # --- for checkpoints ---

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What the next round depends on besides the global adapter: the aggregator's and the
        optimiser's state, each node's known layout and the epsilon it last reported (so that a
        restarted coordinator still refuses a node whose spend went down)."""
        out = {f"{AGGREGATOR}/{k}": v for k, v in self.aggregator.state_dict().items()}
        for node, (rank, scale) in self.node_layouts.items():
            out[f"{LAYOUT}/{node}"] = torch.tensor([rank, scale], dtype=torch.float64)
        for node, epsilon in self.screen.epsilons.items():
            out[f"{EPSILONS}/{node}"] = torch.tensor(epsilon, dtype=torch.float64)
        if self.released is not None:
            out[f"{RELEASED}/rows"] = torch.tensor(self.released[0], dtype=torch.float64)
            out[f"{RELEASED}/by"] = torch.tensor(self.released[1], dtype=torch.float64)
        return {**out, **self.optimiser.state_dict()}

    def load_state_tensors(self, state: Mapping[str, torch.Tensor]) -> None:
        """CheckpointError for state this strategy does not keep."""
        mine: dict[str, dict[str, torch.Tensor]] = {AGGREGATOR: {}, LAYOUT: {}, EPSILONS: {}, RELEASED: {}}
        rest = {}
        for key, value in state.items():
            group, _, name = key.partition("/")
            if group in mine:
                mine[group][name] = value
            else:
                rest[key] = value
        try:
            self.aggregator.load_state_dict(mine[AGGREGATOR])
        except AdapterError as err:
            raise CheckpointError(str(err)) from None
        self.node_layouts = {int(n): (int(v[0]), float(v[1])) for n, v in mine[LAYOUT].items()}
        self.screen.epsilons = {int(n): float(v) for n, v in mine[EPSILONS].items()}
        released = mine[RELEASED]
        self.released = (float(released["rows"]), int(released["by"])) if released else None
        self.optimiser.load_state_dict(rest)


def build_strategy(cfg: FedloraConfig, fingerprint: str, num_clients: int) -> LoraStrategy:
    """The configured strategy, sampling from the ``num_clients`` nodes the federation expects."""
    fed = cfg.federation
    layout = Layout(fingerprint=fingerprint, lora_r=cfg.model.lora_r, lora_scale=lora_scale(cfg.model))
    options = {key: getattr(fed, key) for key in AGGREGATOR_ENTRIES[fed.aggregator].options}
    aggregator = create_aggregator(fed.aggregator, global_scale=layout.lora_scale, **options)
    tolerated = fed.secagg_dropouts if fed.secure_aggregation else 0
    return LoraStrategy(
        layout=layout,
        sampling=Sampling(
            fraction_train=fed.fraction_train,
            fraction_evaluate=fed.fraction_evaluate,
            min_nodes=min(fed.min_clients - tolerated, num_clients),
            min_statistics_nodes=min(fed.min_clients, num_clients),
            node_wait_timeout=fed.node_wait_timeout,
            round_timeout=fed.round_timeout,
        ),
        screen=ReplyScreen(
            layout,
            aggregator,
            fed.max_rank,
            fed.max_scale_ratio,
            NormBounds(fed.max_update_norm, fed.max_norm_ratio),
        ),
        weighting=Weighting(fed.max_examples, fed.max_weight_share),
        aggregator=aggregator,
        optimiser=create_optimiser(
            fed.strategy,
            server_learning_rate=fed.server_learning_rate,
            server_momentum=fed.server_momentum,
            proximal_mu=fed.proximal_mu,
        ),
        wire_dtype=fed.update_dtype,
        secure_heads=fed.secure_aggregation,
    )


def summarise_metrics(metrics: Sequence[Mapping[str, float]], weights: Sequence[float]) -> MetricRecord:
    """Per key, the weighted mean over the replies that carry it (statistics are opt-in, so some
    replies lack them); epsilon the largest spend of any client; num-examples the total claimed."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for m in metrics for k in m):
        carried = [(float(m[key]), w) for m, w in zip(metrics, weights, strict=True) if key in m]
        if key == P.NUM_EXAMPLES:
            out[key] = sum(value for value, _ in carried)
        elif key == P.EPSILON:
            out[key] = max(value for value, _ in carried)
        else:
            out[key] = sum(value * w for value, w in carried) / sum(w for _, w in carried)
    return MetricRecord(out)
