"""LoRA-aware aggregation on top of Flower's strategies.

`LoraAverage` replaces FedAvg's averaging steps: every reply is parsed by common.codec (structure,
metric keys and ranges, fingerprint, rank and scale within what the coordinator allows, tensor keys,
shapes, dtypes, finite values) and its change to the weights bounded; a bad one is dropped with a log
line naming the node and the reason, so it never reaches Flower's checks or an aggregator. The rest,
weighted by bounded example counts, go to a pluggable aggregator (fedavg, exact, ffa). Flower's
server optimisers (FedAvgM, FedAdam, FedYogi, FedProx) call FedAvg's averaging through ``super()``,
so composing them in front of `LoraAverage` gives e.g. FedAdam over exactly aggregated LoRA.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from fedlora.common import protocol as P
from fedlora.common.adapter import State, from_record, to_record
from fedlora.common.codec import ReplyRules, TrainReply, parse_evaluate_reply, parse_train_reply
from fedlora.common.config import FedloraConfig
from fedlora.common.errors import AdapterError, ConfigError, FedloraError
from fedlora.common.lora_math import dropped_factors
from fedlora.common.model import lora_scale
from fedlora.server.aggregators import (
    Aggregator,
    ClientUpdate,
    bounded_weights,
    create_aggregator,
    weight_change_norm,
)

log = logging.getLogger("fedlora.server")
NODE_POLL_SECONDS = 1.0


@dataclass
class RoundLog:
    """What one round saw, per client: kept in the checkpoint and written to metrics files."""

    round: int
    clients: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    aggregation: dict[str, float] = field(default_factory=dict)
    evaluate_dropped: list[dict] = field(default_factory=list)


# Flower's own transport failures: the SuperLink writes their reasons, no client text is in them
TRANSPORT_ERRORS = (
    ErrorCode.MESSAGE_UNAVAILABLE,
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
    ErrorCode.NODE_UNAVAILABLE,
)


def by_node(replies: Iterable[Message]) -> list[Message]:
    """Replies in node order, not arrival order: float sums depend on order, and a resumed round
    must be the same bits as one that never stopped."""
    return sorted(replies, key=lambda msg: msg.metadata.src_node_id)


def failure_reason(error: Error) -> str:
    """What the coordinator keeps of a client's failure: fedlora's fixed category, or Flower's own
    transport reason; any other text is withheld, as it may quote the institution's data (an older
    client, or an exception that escaped fedlora's failure mod)."""
    if error.code in P.FAILURES and error.reason == P.FAILURES[error.code]:
        return error.reason
    if error.code in TRANSPORT_ERRORS:
        lines = [line.strip() for line in error.reason.splitlines() if line.strip()]
        return (lines[-1] if lines else f"transport error {error.code}")[:300]
    return f"client failure (error code {error.code}); its text is withheld: it may quote the client's data"


class LoraAverage(FedAvg):
    """FedAvg whose averaging step validates replies and aggregates LoRA adapters properly."""

    aggregator: Aggregator
    fingerprint: str
    lora_r: int
    lora_scale: float
    wire_dtype: str = "fp32"
    max_update_norm: float | None = None
    max_rank: int
    max_scale_ratio: float
    max_examples: int | None = None
    max_weight_share: float = 1.0
    round_offset: int = 0
    node_wait_timeout: float
    round_timeout: float

    def attach(self, cfg: FedloraConfig, fingerprint: str, round_offset: int = 0) -> LoraAverage:
        fed = cfg.federation
        self.lora_r, self.lora_scale = cfg.model.lora_r, lora_scale(cfg.model)
        options = {"error_feedback": fed.error_feedback} if fed.aggregator == "exact" else {}
        self.aggregator = create_aggregator(fed.aggregator, global_scale=self.lora_scale, **options)
        self.fingerprint = fingerprint
        self.wire_dtype = fed.update_dtype
        self.max_update_norm = fed.max_update_norm
        if self.aggregator.mixed_ranks and fed.max_rank < self.lora_r:
            raise ConfigError(
                f"federation.max_rank: {fed.max_rank} is below the coordinator's model.lora_r {self.lora_r}"
            )
        self.max_rank = fed.max_rank if self.aggregator.mixed_ranks else self.lora_r
        self.max_scale_ratio = fed.max_scale_ratio
        self.max_examples, self.max_weight_share = fed.max_examples, fed.max_weight_share
        self.round_offset = round_offset
        self.node_wait_timeout, self.round_timeout = fed.node_wait_timeout, fed.round_timeout
        self._set_global(ArrayRecord())
        self.rounds: list[RoundLog] = []
        self.node_layouts: dict[int, tuple[int, float]] = {}
        return self

    def _round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        config[P.ROUND] = server_round + self.round_offset
        config[P.FINGERPRINT] = self.fingerprint
        config[P.LORA_R] = self.lora_r
        config[P.LORA_SCALE] = self.lora_scale
        config[P.WIRE_DTYPE] = self.wire_dtype
        return config

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._set_global(arrays)
        config = self._round_config(server_round, config)
        if self.fraction_train:
            self._await_nodes(grid, max(self.min_available_nodes, self.min_train_nodes), server_round)
        return self._expiring(self._per_node(super().configure_train(server_round, arrays, config, grid)))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._set_global(arrays)
        config = self._round_config(server_round, config)
        if self.fraction_evaluate:
            self._await_nodes(grid, max(self.min_available_nodes, self.min_evaluate_nodes), server_round)
        return self._expiring(self._per_node(super().configure_evaluate(server_round, arrays, config, grid)))

    def _set_global(self, arrays: ArrayRecord) -> None:
        self.global_state: State = from_record(arrays)
        self._per_layout: dict[tuple[str, int, float], State] = {}

    def _own(self, rank: int, scale: float) -> State:
        """The global adapter at a client's rank and scale (an SVD per layer), once per layout and round."""
        key = ("own", rank, scale)
        if key not in self._per_layout:
            self._per_layout[key] = self.aggregator.for_client(self.global_state, rank, scale)
        return self._per_layout[key]

    def _fold(self, rank: int, scale: float) -> State:
        """What the truncation to ``rank`` drops, as LoRA factors of the rank difference."""
        key = ("fold", rank, scale)
        if key not in self._per_layout:
            own = self._own(rank, scale)
            self._per_layout[key] = dropped_factors(
                self.global_state, own, self.lora_r - rank, self.lora_scale, scale
            )
        return self._per_layout[key]

    def _await_nodes(self, grid: Grid, needed: int, server_round: int) -> None:
        """Flower's sampling waits for nodes forever: wait at most node_wait_timeout, then stop the run
        with a clear error (the last complete round stays checkpointed)."""
        deadline = time.monotonic() + self.node_wait_timeout
        while (connected := len(list(grid.get_node_ids()))) < needed:
            if time.monotonic() >= deadline:
                raise FedloraError(
                    f"round {server_round + self.round_offset}: only {connected} of the {needed} nodes "
                    f"needed connected within federation.node_wait_timeout ({self.node_wait_timeout:g} s); "
                    "the run stops, its last complete round checkpointed: start the server again to resume"
                )
            time.sleep(NODE_POLL_SECONDS)

    def _expiring(self, messages: list[Message]) -> list[Message]:
        """Messages expire with the round, so the SuperLink refuses a late reply instead of keeping
        it for Flower's default 12 h."""
        for msg in messages:
            msg.metadata.ttl = self.round_timeout
        return messages

    def _per_node(self, messages: Iterable[Message]) -> list[Message]:
        """A node whose rank or scale differs from the global one (known from its earlier replies)
        receives the global adapter truncated to its own layout; below the global rank, also what
        the truncation drops (P.FOLD), so that it can still train on the whole global model."""
        messages = list(messages)
        for msg in messages:
            layout = self.node_layouts.get(msg.metadata.dst_node_id)
            if layout is None or layout == (self.lora_r, self.lora_scale):
                continue
            rank, scale = layout
            config = ConfigRecord(dict(msg.content[P.CONFIG]))
            config[P.LORA_R], config[P.LORA_SCALE] = rank, scale
            content = RecordDict({P.ARRAYS: to_record(self._own(rank, scale)), P.CONFIG: config})
            if rank < self.lora_r:
                content[P.FOLD] = to_record(self._fold(rank, scale))
            msg.content = content
        return messages

    def _rules(self) -> ReplyRules:
        """What a train reply may hold this round: the coordinator's fingerprint and tensor layout,
        ranks up to max_rank (exact) or only the global one, scales per the aggregator."""
        agg, ratio = self.aggregator, self.max_scale_ratio
        if agg.mixed_scales:
            scales = (self.lora_scale / ratio, self.lora_scale * ratio)
            scale_rule = f"a lora-scale within federation.max_scale_ratio {ratio:g} of {self.lora_scale:g}"
        else:
            scales = (self.lora_scale, self.lora_scale)
            scale_rule = (
                f"lora-scale {self.lora_scale:g} (lora_alpha / lora_r, or / sqrt(lora_r) with use_rslora), "
                "as it averages the factors"
            )
        if agg.mixed_ranks:
            rank_rule = f"lora_r up to federation.max_rank {self.max_rank}"
        else:
            rank_rule = f"lora_r {self.lora_r}"
        return ReplyRules(
            fingerprint=self.fingerprint,
            shapes=agg.reply_shapes(self.global_state),
            ranks=(1 if agg.mixed_ranks else self.lora_r, self.max_rank),
            scales=scales,
            hint=f" (federation.aggregator {agg.name} needs {rank_rule} and {scale_rule})",
        )

    def _screen(self, msg: Message, rules: ReplyRules) -> tuple[ClientUpdate, TrainReply, float]:
        """The client's adapter after training, its parsed reply and its weight change norm, or
        AdapterError saying why the reply is refused."""
        reply = parse_train_reply(msg.content, rules)
        rank, scale = reply.metrics.lora_r, reply.metrics.lora_scale
        start = self._own(rank, scale)
        after = {**start, **{k: start[k] + v for k, v in reply.update.items()}}
        norm = weight_change_norm(start, after, scale)
        if self.max_update_norm is not None and norm > self.max_update_norm:
            raise AdapterError(
                f"weight change norm {norm:.4g} exceeds the bound {self.max_update_norm:.4g} "
                "(federation.max_update_norm)"
            )
        update = ClientUpdate(
            node_id=msg.metadata.src_node_id,
            state={k: after[k] for k in reply.update},
            num_examples=reply.metrics.num_examples,
            scale=scale,
            start={k: start[k] for k in reply.update},
        )
        return update, reply, norm

    def _drop(self, dropped: list[dict], round_: int, msg: Message, reason: str, what: str) -> None:
        node = msg.metadata.src_node_id
        log.warning("round %d: dropped %s reply from node %d: %s", round_, what, node, reason)
        dropped.append({"node": node, "reason": reason})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = RoundLog(round=server_round + self.round_offset)
        self.rounds.append(record)
        rules = self._rules()
        accepted: list[tuple[ClientUpdate, TrainReply]] = []
        for msg in by_node(replies):
            if msg.has_error():
                self._drop(record.dropped, record.round, msg, failure_reason(msg.error), "train")
                continue
            try:
                update, reply, norm = self._screen(msg, rules)
            except AdapterError as err:
                self._drop(record.dropped, record.round, msg, str(err), "train")
                continue
            accepted.append((update, reply))
            arrays = msg.content[P.ARRAYS].values()
            record.clients.append(
                {
                    "node": update.node_id,
                    **{k: float(v) for k, v in reply.metrics.values().items()},
                    "update_norm": norm,
                    "bytes": sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays),
                }
            )
        if not accepted:
            log.warning("round %d: no usable reply; the global adapter stays as it was", record.round)
            return None, None
        weights = self._weights([reply.metrics.num_examples for _, reply in accepted])
        for entry, weight in zip(record.clients, weights, strict=True):
            entry["weight"] = weight / sum(weights)
        for update, reply in accepted:
            self.node_layouts[update.node_id] = (reply.metrics.lora_r, reply.metrics.lora_scale)
        updates = [replace(u, num_examples=w) for (u, _), w in zip(accepted, weights, strict=True)]
        result = self.aggregator.aggregate(self.global_state, updates)
        record.aggregation = result.metrics
        merged = {**self.global_state, **result.state}
        arrays = ArrayRecord({k: v.to(torch.float32).contiguous() for k, v in merged.items()})
        return arrays, summarise_metrics([reply.metrics.values() for _, reply in accepted], weights)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Client evaluation metrics through the codec: a malformed reply is dropped, not fatal."""
        absolute = server_round + self.round_offset
        dropped = (
            self.rounds[-1].evaluate_dropped if self.rounds and self.rounds[-1].round == absolute else []
        )
        parsed = []
        for msg in by_node(replies):
            try:
                if msg.has_error():
                    raise AdapterError(failure_reason(msg.error))
                parsed.append(parse_evaluate_reply(msg.content))
            except AdapterError as err:
                self._drop(dropped, absolute, msg, str(err), "evaluate")
        if not parsed:
            return None
        weights = self._weights([m.num_examples for m in parsed])
        return summarise_metrics([m.values() for m in parsed], weights)

    def _weights(self, claims: Sequence[float]) -> list[float]:
        return bounded_weights(claims, self.max_examples, self.max_weight_share)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Server-optimiser moments, aggregator state and each node's known layout (what it is sent
        next round depends on it), for checkpoints."""
        out = {f"aggregator/{k}": v for k, v in self.aggregator.state_dict().items()}
        for node, (rank, scale) in self.node_layouts.items():
            out[f"{LAYOUT}/{node}"] = torch.tensor([rank, scale], dtype=torch.float64)
        for name in ("m_t", "v_t"):
            for k, v in (getattr(self, name, None) or {}).items():
                out[f"{name}/{k}"] = torch.from_numpy(np.asarray(v).copy())
        for i, v in enumerate(getattr(self, "momentum_vector", None) or []):
            out[f"momentum_vector/{i:06d}"] = torch.from_numpy(np.asarray(v).copy())
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            group, _, name = key.partition("/")
            groups.setdefault(group, {})[name] = value
        self.aggregator.load_state_dict(groups.get("aggregator", {}))
        self.node_layouts = {
            int(node): (int(value[0]), float(value[1])) for node, value in groups.get(LAYOUT, {}).items()
        }
        for name in ("m_t", "v_t"):
            if name in groups:
                setattr(self, name, {k: v.numpy() for k, v in groups[name].items()})
        if "momentum_vector" in groups:
            self.momentum_vector = [
                groups["momentum_vector"][k].numpy() for k in sorted(groups["momentum_vector"])
            ]


class LoraFedAvgM(FedAvgM, LoraAverage):
    """FedAvgM's server momentum over LoRA-aggregated adapters."""


class LoraFedAdam(FedAdam, LoraAverage):
    """FedAdam over LoRA-aggregated adapters."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Adam's bias correction counts the federation's rounds; Flower restarts at 1 on resume, so
        FedAdam gets the absolute round (and LoraAverage, below it, no offset to add again)."""
        offset, self.round_offset = self.round_offset, 0
        try:
            return super().aggregate_train(server_round + offset, replies)
        finally:
            self.round_offset = offset


class LoraFedYogi(FedYogi, LoraAverage):
    """FedYogi over LoRA-aggregated adapters."""


class LoraFedProx(FedProx, LoraAverage):
    """FedProx: clients pull toward the round's start (see client.trainer); averaging as LoraAverage."""


STRATEGIES: dict[str, type[LoraAverage]] = {
    "fedavg": LoraAverage,
    "fedavgm": LoraFedAvgM,
    "fedadam": LoraFedAdam,
    "fedyogi": LoraFedYogi,
    "fedprox": LoraFedProx,
}


def build_strategy(
    cfg: FedloraConfig, fingerprint: str, num_clients: int, round_offset: int = 0
) -> LoraAverage:
    """The configured strategy, sampling from the ``num_clients`` nodes the federation expects."""
    fed = cfg.federation
    minimum = min(fed.min_clients, num_clients)
    common = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_nodes": minimum,
        "min_evaluate_nodes": minimum if fed.fraction_evaluate else 0,
        "min_available_nodes": minimum,
    }
    extra = {
        "fedavgm": {"server_learning_rate": fed.server_learning_rate, "server_momentum": fed.server_momentum},
        "fedadam": {"eta": fed.server_learning_rate, "eta_l": cfg.training.learning_rate},
        "fedyogi": {"eta": fed.server_learning_rate, "eta_l": cfg.training.learning_rate},
        "fedprox": {"proximal_mu": fed.proximal_mu},
    }.get(fed.strategy, {})
    strategy = STRATEGIES[fed.strategy](**common, **extra)
    return strategy.attach(cfg, fingerprint, round_offset)


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


LAYOUT = "node_layout"  # state_tensors' group of node -> (rank, scale)
