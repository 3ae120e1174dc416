"""LoRA-aware aggregation on top of Flower's strategies.

`LoraAverage` replaces only FedAvg's averaging step: it validates every reply (fingerprint, keys,
shapes, finite values, norm) and drops a bad one with a log line naming the node and the reason,
then hands the rest to a pluggable aggregator (fedavg, exact, ffa). Flower's server optimisers
(FedAvgM, FedAdam, FedYogi, FedProx) call FedAvg's averaging through ``super()``, so composing them
in front of `LoraAverage` gives e.g. FedAdam over exactly aggregated LoRA.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from fedlora.common import protocol as P
from fedlora.common.adapter import State, from_record, l2_norm, shapes, to_record, validate_update
from fedlora.common.config import FedloraConfig
from fedlora.common.errors import AdapterError, FedloraError
from fedlora.common.lora_math import dropped_factors
from fedlora.common.model import lora_scale
from fedlora.server.aggregators import Aggregator, ClientUpdate, create_aggregator

log = logging.getLogger("fedlora.server")
NODE_POLL_SECONDS = 1.0


@dataclass
class RoundLog:
    """What one round saw, per client: kept in the checkpoint and written to metrics files."""

    round: int
    clients: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    aggregation: dict[str, float] = field(default_factory=dict)


def last_line(text: str, limit: int = 300) -> str:
    """The gist of a client's error (Ray wraps it in a multi-line traceback)."""
    lines = [line.strip(" '>\n") for line in text.splitlines() if line.strip(" '>")]
    return (lines[-1] if lines else text)[:limit]


class LoraAverage(FedAvg):
    """FedAvg whose averaging step validates replies and aggregates LoRA adapters properly."""

    aggregator: Aggregator
    fingerprint: str
    lora_r: int
    lora_scale: float
    wire_dtype: str = "fp32"
    max_update_norm: float | None = None
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

    def _screen(self, msg: Message) -> ClientUpdate:
        """The client's adapter after training, or AdapterError saying why the reply is refused."""
        content = msg.content
        try:
            theirs = content[P.CONFIG][P.FINGERPRINT]
            metrics = content[P.METRICS]
            num, rank, scale = metrics[P.NUM_EXAMPLES], int(metrics[P.LORA_R]), float(metrics[P.LORA_SCALE])
            arrays = content[P.ARRAYS]
        except (KeyError, TypeError, ValueError) as err:
            raise AdapterError(f"malformed reply (missing {err})") from None
        if theirs != self.fingerprint:
            raise AdapterError(f"fingerprint {theirs} is not the federation's {self.fingerprint}")
        if not (isinstance(num, int | float) and num > 0 and math.isfinite(num)):
            raise AdapterError(f"{P.NUM_EXAMPLES} must be a positive number, got {num!r}")
        if rank < 1 or not math.isfinite(scale) or scale <= 0:
            raise AdapterError(f"bad LoRA rank {rank} or scale {scale}")
        start = self._own(rank, scale)
        keys = self.aggregator.wire_keys(self.global_state)
        update = from_record(arrays)
        validate_update(update, {k: shapes(start)[k] for k in keys}, self.max_update_norm)
        self.node_layouts[msg.metadata.src_node_id] = (rank, scale)
        return ClientUpdate(
            node_id=msg.metadata.src_node_id,
            state={k: start[k] + update[k] for k in keys},
            num_examples=int(num),
            scale=scale,
            start={k: start[k] for k in keys},
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = RoundLog(round=server_round + self.round_offset)
        self.rounds.append(record)
        good, updates = [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                reason = last_line(msg.error.reason)
            else:
                try:
                    updates.append(self._screen(msg))
                    good.append(msg)
                    metrics = msg.content[P.METRICS]
                    record.clients.append(
                        {
                            "node": node,
                            **{k: float(v) for k, v in metrics.items()},
                            "update_norm": l2_norm(
                                {
                                    k: updates[-1].state[k] - self.global_state[k].to(torch.float32)
                                    for k in updates[-1].state
                                    if updates[-1].state[k].shape == self.global_state[k].shape
                                }
                            ),
                            "bytes": sum(a.numpy().nbytes for a in msg.content[P.ARRAYS].values()),
                        }
                    )
                    continue
                except AdapterError as err:
                    reason = str(err)
            log.warning("round %d: dropped reply from node %d: %s", record.round, node, reason)
            record.dropped.append({"node": node, "reason": reason})
        if not updates:
            log.warning("round %d: no usable reply; the global adapter stays as it was", record.round)
            return None, None
        self._check_and_log_replies(good, is_train=True)
        result = self.aggregator.aggregate(self.global_state, updates)
        record.aggregation = result.metrics
        merged = {**self.global_state, **result.state}
        arrays = ArrayRecord({k: v.to(torch.float32).contiguous() for k, v in merged.items()})
        contents: list[RecordDict] = [m.content for m in good]
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

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
        "train_metrics_aggr_fn": aggregate_client_metrics,
        "evaluate_metrics_aggr_fn": aggregate_client_metrics,
    }
    extra = {
        "fedavgm": {"server_learning_rate": fed.server_learning_rate, "server_momentum": fed.server_momentum},
        "fedadam": {"eta": fed.server_learning_rate, "eta_l": cfg.training.learning_rate},
        "fedyogi": {"eta": fed.server_learning_rate, "eta_l": cfg.training.learning_rate},
        "fedprox": {"proximal_mu": fed.proximal_mu},
    }.get(fed.strategy, {})
    strategy = STRATEGIES[fed.strategy](**common, **extra)
    return strategy.attach(cfg, fingerprint, round_offset)


def aggregate_client_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted means, except epsilon: the federation reports the largest spend of any client."""
    weights = [float(next(iter(r.metric_records.values()))[weight_key]) for r in records]
    total = sum(weights) or 1.0
    out: dict[str, float] = {}
    for record, weight in zip(records, weights, strict=True):
        for key, value in next(iter(record.metric_records.values())).items():
            if key == weight_key or isinstance(value, list):
                continue
            if key == P.EPSILON:
                out[key] = max(out.get(key, 0.0), float(value))
            else:
                out[key] = out.get(key, 0.0) + float(value) * weight / total
    out[weight_key] = total
    return MetricRecord(out)


LAYOUT = "node_layout"  # state_tensors' group of node -> (rank, scale)
