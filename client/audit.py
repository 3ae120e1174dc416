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
from pathlib import Path

from flwr.app import Context, Message

from fedlora.client.failures import failure_reply, reason_for
from fedlora.common import protocol as P
from fedlora.common.codec import check_outgoing
from fedlora.common.errors import AdapterError

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
