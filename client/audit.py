"""A Flower mod that records what leaves the institution: names, shapes and sizes, never values.

Privacy officers read it to confirm that only adapter tensors and a few scalars cross the wire; the
test suite reads it for the same reason. Every message that leaves is recorded, an error reply
included (its code and fixed category only: see client.failures, composed inside this mod).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context, Message

from fedlora.client.failures import failure_reply, reason_for
from fedlora.common import protocol as P
from fedlora.common.codec import check_outgoing
from fedlora.common.errors import AdapterError, CheckpointError

log = logging.getLogger("fedlora.client")
Next = Callable[[Message, Context], Message]


def describe(reply: Message) -> dict:
    """One audit line for an outgoing message."""
    line: dict = {"time": time.time(), "type": reply.metadata.message_type}
    if reply.has_error():
        line["error"] = {"code": reply.error.code, "category": reason_for(reply.error.code)}
        return line
    content = reply.content
    arrays = {
        name: {key: {"shape": list(a.shape), "dtype": a.dtype} for key, a in record.items()}
        for name, record in content.array_records.items()
    }
    line["arrays"] = arrays
    line["bytes"] = sum(len(a.data) for record in content.array_records.values() for a in record.values())
    line["metrics"] = {n: dict(r) for n, r in content.metric_records.items()}
    line["configs"] = {n: dict(r) for n, r in content.config_records.items()}
    return line


def received(msg: Message) -> dict:
    """Shapes and short digests of the arrays a client was sent: proves which global it trained on.
    Arrays of another record than the adapter (P.FOLD) are keyed ``<record>/<key>``."""
    if not msg.has_content():
        return {}
    return {
        key if name == P.ARRAYS else f"{name}/{key}": {
            "shape": list(a.shape),
            "sha256": hashlib.sha256(a.data).hexdigest()[:16],
        }
        for name, record in msg.content.array_records.items()
        for key, a in record.items()
    }


def audit_mod(path_for: Callable[[Context], Path | None]) -> Callable[[Message, Context, Next], Message]:
    """A mod appending one JSON line per outgoing message to the file ``path_for(context)`` names. A
    reply that is not exactly what the codec builds, or that the audit log cannot record, does not
    leave: an error reply goes instead."""

    def mod(msg: Message, context: Context, call_next: Next) -> Message:
        path = path_for(context)
        reply = call_next(msg, context)
        if not reply.has_error():
            try:
                check_outgoing(reply.content, reply.metadata.message_type)
            except AdapterError as err:
                log.error("refusing to send a reply the codec does not build: %s", err)
                reply = failure_reply(msg, err)
        if path is None:
            return reply
        line = describe(reply)
        config = msg.content.config_records.get(P.CONFIG) if msg.has_content() else None
        server_round = config.get(P.ROUND) if config else None
        line["round"] = server_round if isinstance(server_round, int) else None
        line["received"] = received(msg)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as handle:
                handle.write(json.dumps(line) + "\n")
        except OSError as err:
            log.error("audit log %s cannot be written; the reply is not sent", path, exc_info=err)
            return failure_reply(msg, err)
        return reply

    return mod


@dataclass(frozen=True)
class Released:
    """What the audit log proves has left in training replies: the steps each round's update
    reported, and the highest cumulative epsilon any of them reported. The ledger must cover it."""

    path: Path | None = None
    steps: dict[int, int] = field(default_factory=dict)
    epsilon: float = 0.0


def key_exchange(entry: dict) -> bool:
    """A secure aggregation reply that releases nothing: keys, shares or a signature
    (client.secure_statistics), or a head round's joining of the secure sum; its masked input is the
    release, recorded as any statistics or head-gradient reply is."""
    stage = entry.get("configs", {}).get(P.CONFIG, {}).get(P.SECAGG_STAGE)
    return stage == P.JOIN_SECURE_SUM or (stage in P.SECAGG_STAGES and stage != P.MASKED_INPUT)


def released(path: Path | None) -> Released:
    """Read the audit log at ``path`` (none kept, or none yet: nothing proven). A line that is not an
    audit line is refused naming the file and line, except a torn last line (a crash mid-write)."""
    if path is None or not path.exists():
        return Released(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise CheckpointError(f"{path}: audit log is unreadable ({err}); refusing to train") from None
    lines = text.split("\n")
    steps: dict[int, int] = {}
    epsilon = 0.0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if entry.get("type") != "train" or "error" in entry or key_exchange(entry):
                continue
            metrics = entry["metrics"][P.METRICS]
            server_round, reported = entry["round"], metrics[P.EPSILON]
            round_steps = metrics[P.STEPS]
            if not all(isinstance(v, int | float) for v in (server_round, reported, round_steps)):
                raise ValueError("round, epsilon and steps must be numbers")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            if number == len(lines):
                continue  # torn by a crash mid-append: the reply it describes never left
            raise CheckpointError(
                f"{path}:{number}: not an audit line ({type(err).__name__}: {err}); refusing to train "
                "without knowing what left"
            ) from None
        steps[int(server_round)] = max(steps.get(int(server_round), 0), int(round_steps))
        epsilon = max(epsilon, float(reported))
    return Released(path, steps, epsilon)
