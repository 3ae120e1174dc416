"""The record of one round, and the one summary of it that every report shows.

A history entry is a `RoundLog` as a dict plus the central scores (the final test), the validation
scores (common.held_out), the federated evaluation's aggregate when clients evaluated, and a time; it
is kept in the checkpoint and `history.json`. The coordinator's status, the simulation's progress and
report, and the benchmarks all read entries through `summarise_round`, so they count replies, drops
and privacy spend the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fedlora.common import protocol as P
from fedlora.common.held_out import VALIDATION, selection
from fedlora.common.scoring import MACRO_F1, headline
from fedlora.common.tracking import Tracker


@dataclass
class RoundLog:
    """What one round saw, per client: kept in the checkpoint and written to metrics files."""

    round: int
    clients: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    aggregation: dict[str, float] = field(default_factory=dict)
    evaluate_dropped: list[dict] = field(default_factory=list)
    statistics_only: int = 0
    """Replies of institutions whose planner found DP-SGD would add nothing (client.recipe): no
    LoRA steps, an empty update left out of the average; their budget went to round 0's statistics."""
    head_gradients: int = 0
    """Head-round replies (client.head_rounds): noisy head-gradient sums, the head stepped on their sum."""
    no_training: list[int] = field(default_factory=list)
    """The nodes among ``statistics_only`` whose reply said why (P.STATISTICS_ONLY): their plan trains
    in no round after round 0."""
    ended_early: str = ""
    """Why the federation ended after this round, before its last (server.app.end_if_nothing_trains);
    "" for a round it went on after."""


@dataclass(frozen=True)
class RoundSummary:
    """One history entry in the figures people read."""

    round: int
    replies: int
    dropped: int
    examples: float
    epsilon: float
    """The largest privacy spend of any client that replied (0 without DP or without replies)."""
    client_loss: float | None
    """The mean training loss of the clients that released one (privacy.release_metrics), else None."""
    central: Mapping[str, float]
    validation: Mapping[str, float] = field(default_factory=dict)
    statistics_only: int = 0
    head_gradients: int = 0
    ended_early: str = ""

    def line(self, rounds: int) -> str:
        """The round in one line, e.g. for a log file or a terminal that is not interactive. Round 0
        is named as the statistics round (the round-0 class statistics, server.statistics_head): it
        trained no LoRA, yet spent budget and built the head."""
        stage = " (statistics)" if self.round == 0 else ""
        text = f"round {self.round}/{rounds}{stage}: {self.replies} replies, {self.dropped} dropped"
        if self.statistics_only:
            text += f", {self.statistics_only} statistics only (no LoRA steps planned)"
        if self.head_gradients:
            text += f", {self.head_gradients} head rounds (no LoRA steps, the head stepped)"
        if self.replies:
            if self.client_loss is not None:
                text += f", loss {self.client_loss:.4f}"
            text += f", epsilon {self.epsilon:.3f}"
        text += "".join(f", central {k} {v:.4g}" for k, v in headline(self.central).items())
        chosen = selection(self.validation)
        text += f", validation {chosen[0]} {chosen[1]:.4g}" if chosen else ""
        return text + (f"; the federation ends here: {self.ended_early}" if self.ended_early else "")


def summarise_round(entry: Mapping) -> RoundSummary:
    clients = entry.get("clients", [])
    losses = [float(c[P.LOSS]) for c in clients if P.LOSS in c]
    return RoundSummary(
        round=int(entry["round"]),
        replies=len(clients),
        dropped=len(entry.get("dropped", [])),
        examples=float(sum(c.get(P.NUM_EXAMPLES, 0.0) for c in clients)),
        epsilon=max((float(c.get(P.EPSILON, 0.0)) for c in clients), default=0.0),
        client_loss=sum(losses) / len(losses) if losses else None,
        central=dict(entry.get("central") or {}),
        validation=dict(entry.get(VALIDATION) or {}),
        statistics_only=int(entry.get("statistics_only", 0)),
        head_gradients=int(entry.get("head_gradients", 0)),
        ended_early=str(entry.get("ended_early", "")),
    )


def client_names(history: list[dict]) -> dict[int, str]:
    """Stable names for Flower's random node ids: client-1.. in order of first appearance."""
    names: dict[int, str] = {}
    for entry in history:
        for client in sorted(entry.get("clients", []), key=lambda c: c["node"]):
            names.setdefault(int(client["node"]), f"client-{len(names) + 1}")
    return names


def round_metrics(entry: Mapping, names: Mapping[int, str]) -> dict[str, float]:
    """What experiment tracking logs of a round (common.tracking): the global test scores, replies
    and drops, and each institution's reported epsilon under its name (``epsilon/client-1``); the
    aggregates and released scalars the history already holds, nothing per example."""
    summary = summarise_round(entry)
    found = {k: float(summary.central[k]) for k in ("accuracy", MACRO_F1, "loss") if k in summary.central}
    found.update(replies=float(summary.replies), dropped=float(summary.dropped))
    for client in entry.get("clients", []):
        if P.EPSILON in client:
            found[f"epsilon/{names[int(client['node'])]}"] = float(client[P.EPSILON])
    return found


def track_history(tracker: Tracker, history: list[dict]) -> None:
    """Every round of a history as tracking metrics, step = round."""
    names = client_names(history)
    for entry in history:
        tracker.metrics(round_metrics(entry, names), step=int(entry["round"]))
