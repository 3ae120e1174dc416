"""Which replies reach aggregation: each is parsed by common.codec (structure, metric keys and ranges,
fingerprint, rank and scale within what the coordinator allows, tensor keys, shapes, dtypes, finite
values) and its change to the weights bounded. A bad one is refused with a reason that names it, so it
never reaches an aggregator; a failure keeps only a fixed category, never the client's text. A node's
cumulative epsilon never goes down (a lost or reset ledger), only its first reply of a round counts,
and what is recorded of a refusal is capped in length (a client chooses the strings it quotes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Error, Message
from flwr.common.constant import SUPERLINK_NODE_ID

from fedlora.common import protocol as P
from fedlora.common.codec import (
    EvaluateMetrics,
    HeadReply,
    ReplyRules,
    TrainMetrics,
    parse_evaluate_reply,
    parse_head_gradient_reply,
    parse_train_reply,
)
from fedlora.common.errors import AdapterError, ConfigError
from fedlora.server.aggregators import Aggregator, ClientUpdate, weight_change_norm
from fedlora.server.global_adapter import GlobalAdapter, Layout

log = logging.getLogger("fedlora.server")
# Flower's own transport failures by the values of its Error codes on the wire, kept as their
# category only: their text is not fedlora's to vouch for
TRANSPORT_ERRORS = {3: "message unavailable", 4: "reply message unavailable", 5: "node unavailable"}
MAX_REASON = 300
"""Characters of a refusal's reason kept in the log, the round's history and every checkpoint."""
EPSILON_SLACK = 0.01
"""How far a node's reported cumulative epsilon may fall below its last one before the reply is
refused: Opacus' PRV accountant computes epsilon to within 0.01 (its default eps_error)."""


def by_node(replies: Iterable[Message]) -> list[Message]:
    """Replies in node order, not arrival order: float sums depend on order, and a resumed round
    must be the same bits as one that never stopped."""
    return sorted(replies, key=lambda msg: msg.metadata.src_node_id)


def capped(reason: str) -> str:
    """``reason`` at most MAX_REASON characters, marked where it was cut."""
    if len(reason) <= MAX_REASON:
        return reason
    marker = f" ... [cut: {len(reason)} characters in all]"
    return reason[: MAX_REASON - len(marker)] + marker


def drop(
    dropped: list[dict], server_round: int, msg: Message, reason: str, what: str, node: int | None = None
) -> None:
    """A refused reply in the log and in the round's ``dropped``, its reason capped (it may quote
    strings of the client's choosing: 4 MB of them were kept whole in every checkpoint); ``node``: the
    node it speaks for, when not its sender (the SuperLink's error for a node it found unavailable)."""
    node, reason = msg.metadata.src_node_id if node is None else node, capped(reason)
    log.warning("round %d: dropped %s reply from node %d: %s", server_round, what, node, reason)
    dropped.append({"node": node, "reason": reason})


def failure_reason(error: Error) -> str:
    """What the coordinator keeps of a client's failure: fedlora's fixed category, or the category of
    Flower's transport failure; any other text is withheld, as it may quote the institution's data (an
    older client, or an exception that escaped fedlora's failure mod)."""
    if error.code in P.FAILURES and error.reason == P.FAILURES[error.code]:
        return error.reason
    if error.code in TRANSPORT_ERRORS:
        return f"{TRANSPORT_ERRORS[error.code]} (Flower error code {error.code}); its text is not kept"
    return f"client failure (error code {error.code}); its text is withheld: it may quote the client's data"


def sender(msg: Message) -> int:
    return msg.metadata.src_node_id


def speaks_for(reply: Message, asked: Mapping[str, int]) -> int:
    """The node a reply is about: its sender, or, for the SuperLink's own error reply (a node found
    unavailable, a message expired: sent as node 1), the node that the message it answers (``asked``:
    message id -> destination) was sent to."""
    node = sender(reply)
    if node == SUPERLINK_NODE_ID:
        return asked.get(reply.metadata.reply_to_message_id, node)
    return node


def first_per_node(
    replies: Iterable[Message],
    server_round: int,
    dropped: list[dict],
    what: str,
    node_of: Callable[[Message], int] = sender,
) -> list[Message]:
    """Replies in node order, only the first of each node (a node answers a round once; a second
    reply would count its update or its score twice); each later one dropped with its reason."""
    seen: set[int] = set()
    kept = []
    for msg in sorted(replies, key=node_of):
        node = node_of(msg)
        if node in seen:
            drop(
                dropped,
                server_round,
                msg,
                "a second reply from this node this round: only its first counts",
                what,
                node,
            )
        else:
            seen.add(node)
            kept.append(msg)
    return kept


@dataclass(frozen=True)
class NormBounds:
    """How far one reply may move the weights: at most ``absolute``, and at most ``ratio`` times the
    round's median (its lower median for an even count), an adaptive bound that needs no knowledge
    of the learning rates and steps the institutions planned; None disables either."""

    absolute: float | None = None
    ratio: float | None = None

    def median(self, norms: Sequence[float]) -> float | None:
        """The round's reference norm; None when there is nothing to compare with (fewer than two
        replies, or a median of 0: replies that trained no step)."""
        if self.ratio is None or len(norms) < 2:
            return None
        reference = sorted(norms)[(len(norms) - 1) // 2]
        return reference if reference > 0 else None


@dataclass(frozen=True)
class Screened:
    """An accepted train reply: the client's adapter after training, what it said, what it did."""

    update: ClientUpdate
    metrics: TrainMetrics
    norm: float
    """The L2 norm of its change to the weights (`weight_change_norm`)."""
    bytes: int
    plan: str | None = None
    """Why an update of no steps trained nothing, as the reply said (P.PLAN), else None."""

    def entry(self, weight: float) -> dict:
        """Its line in the round's history, with its share of the round's weight."""
        values = {k: float(v) for k, v in self.metrics.values().items()}
        return {
            "node": self.update.node_id,
            **values,
            "update_norm": self.norm,
            "bytes": self.bytes,
            "weight": weight,
        }


class ReplyScreen:
    """The coordinator's rules for replies, from its adapter layout and the aggregator's needs."""

    def __init__(
        self,
        layout: Layout,
        aggregator: Aggregator,
        max_rank: int,
        max_scale_ratio: float,
        norms: NormBounds,
    ) -> None:
        if aggregator.mixed_ranks and max_rank < layout.lora_r:
            raise ConfigError(
                f"federation.max_rank: {max_rank} is below the coordinator's model.lora_r {layout.lora_r}"
            )
        self.layout, self.aggregator = layout, aggregator
        self.max_rank = max_rank if aggregator.mixed_ranks else layout.lora_r
        self.max_scale_ratio = max_scale_ratio
        self.norms = norms
        self.epsilons: dict[int, float] = {}
        """Each node's largest reported cumulative epsilon (kept in checkpoints by the strategy)."""

    def rules(self, global_adapter: GlobalAdapter) -> ReplyRules:
        """What a train reply may hold this round: the coordinator's fingerprint and tensor layout,
        ranks up to max_rank (exact) or only the global one, scales per the aggregator."""
        agg, ratio, scale = self.aggregator, self.max_scale_ratio, self.layout.lora_scale
        if agg.mixed_scales:
            scales = (scale / ratio, scale * ratio)
            scale_rule = f"a lora-scale within federation.max_scale_ratio {ratio:g} of {scale:g}"
        else:
            scales = (scale, scale)
            scale_rule = (
                f"lora-scale {scale:g} (lora_alpha / lora_r, or / sqrt(lora_r) with use_rslora), "
                "as it averages the factors"
            )
        if agg.mixed_ranks:
            rank_rule = f"lora_r up to federation.max_rank {self.max_rank}"
        else:
            rank_rule = f"lora_r {self.layout.lora_r}"
        return ReplyRules(
            fingerprint=self.layout.fingerprint,
            shapes=agg.reply_shapes(global_adapter.state),
            ranks=(1 if agg.mixed_ranks else self.layout.lora_r, self.max_rank),
            scales=scales,
            hint=f" (federation.aggregator {agg.name} needs {rank_rule} and {scale_rule})",
        )

    def train_replies(
        self,
        replies: Iterable[Message],
        global_adapter: GlobalAdapter,
        server_round: int,
        dropped: list[dict],
        node_of: Callable[[Message], int] = sender,
    ) -> list[Screened]:
        """The accepted replies in node order; each refused one logged and added to ``dropped`` under
        the node it speaks for (``node_of``: see speaks_for)."""
        rules = self.rules(global_adapter)
        screened = []
        for msg in first_per_node(replies, server_round, dropped, "train", node_of):
            try:
                screened.append((msg, self.train(msg, global_adapter, rules)))
            except AdapterError as err:
                drop(dropped, server_round, msg, str(err), "train", node_of(msg))
        median = self.norms.median([s.norm for _, s in screened])
        accepted = []
        for msg, s in screened:
            if median is not None and s.norm > self.norms.ratio * median:
                reason = (
                    f"weight change norm {s.norm:.4g} is {s.norm / median:.3g} times the round's median "
                    f"{median:.4g} (federation.max_norm_ratio {self.norms.ratio:g})"
                )
                drop(dropped, server_round, msg, reason, "train")
            else:
                accepted.append(s)
        return accepted

    def head_replies(
        self, replies: Iterable[Message], values: int, server_round: int, dropped: list[dict]
    ) -> list[tuple[int, HeadReply]]:
        """The accepted head-round replies (common.head_gradient) of ``values`` values by node, in
        node order: keys, shape, dtype, finite values, fingerprint and a cumulative epsilon that never
        went down; each refused one logged and added to ``dropped``. Nothing bounds a noisy gradient
        sum's norm here: the noise dominates it by design; the clip bounds each row's part."""
        accepted = []
        for msg in by_node(replies):
            node = msg.metadata.src_node_id
            try:
                reply = parse_head_gradient_reply(msg.content, self.layout.fingerprint, values)
                self.check_epsilon(node, reply.metrics.epsilon)
            except AdapterError as err:
                drop(dropped, server_round, msg, str(err), "head-gradient")
                continue
            accepted.append((node, reply))
        return accepted

    def evaluate_replies(
        self,
        replies: Iterable[Message],
        server_round: int,
        dropped: list[dict],
        node_of: Callable[[Message], int] = sender,
    ) -> list[EvaluateMetrics]:
        """The accepted evaluate replies' metrics in node order; each refused one logged and added to
        ``dropped`` under the node it speaks for."""
        accepted = []
        for msg in first_per_node(replies, server_round, dropped, "evaluate", node_of):
            try:
                accepted.append(self.evaluate(msg))
            except AdapterError as err:
                drop(dropped, server_round, msg, str(err), "evaluate", node_of(msg))
        return accepted

    def train(self, msg: Message, global_adapter: GlobalAdapter, rules: ReplyRules) -> Screened:
        """The accepted reply, or AdapterError saying why it is refused."""
        if msg.has_error():
            raise AdapterError(failure_reason(msg.error))
        reply = parse_train_reply(msg.content, rules)
        self.check_epsilon(msg.metadata.src_node_id, reply.metrics.epsilon)
        rank, scale = reply.metrics.lora_r, reply.metrics.lora_scale
        start = global_adapter.own(rank, scale)
        after = {**start, **{k: start[k] + v for k, v in reply.update.items()}}
        norm = weight_change_norm(start, after, scale)
        bound = self.norms.absolute
        if bound is not None and norm > bound:
            raise AdapterError(
                f"weight change norm {norm:.4g} exceeds the bound {bound:.4g} (federation.max_update_norm)"
            )
        update = ClientUpdate(
            node_id=msg.metadata.src_node_id,
            state={k: after[k] for k in reply.update},
            num_examples=reply.metrics.num_examples,
            scale=scale,
            start={k: start[k] for k in reply.update},
        )
        arrays = msg.content[P.ARRAYS].values()
        size = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays)
        return Screened(update=update, metrics=reply.metrics, norm=norm, bytes=size, plan=reply.plan)

    def check_epsilon(self, node: int, epsilon: float) -> None:
        """Remember ``node``'s reported cumulative epsilon; AdapterError, naming the node, when it
        went down: a spend only grows, so its ledger was lost, cleared or restored from an old copy
        and its budget would silently start again."""
        before = self.epsilons.get(node, 0.0)
        if epsilon < before - EPSILON_SLACK:
            raise AdapterError(
                f"node {node} reports cumulative epsilon {epsilon:.4g}, below the {before:.4g} it reported "
                "before: its privacy ledger was lost or reset; its replies are refused until it is restored"
            )
        self.epsilons[node] = max(before, epsilon)

    @staticmethod
    def evaluate(msg: Message) -> EvaluateMetrics:
        """An evaluate reply's metrics, or AdapterError saying why it is refused."""
        if msg.has_error():
            raise AdapterError(failure_reason(msg.error))
        return parse_evaluate_reply(msg.content)
