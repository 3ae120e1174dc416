"""Flower message metadata for hand-built messages (Message() outside a run needs it explicitly)."""

from __future__ import annotations

import itertools
import time

from flwr.app import Message, Metadata, RecordDict

_ids = itertools.count()


def metadata(src: int, dst: int, reply_to: str = "") -> Metadata:
    """A train message's metadata from node ``src`` to ``dst``; ``reply_to`` marks a reply."""
    return Metadata(
        run_id=1,
        message_id=f"m{next(_ids)}",
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=time.time(),
        ttl=60,
        message_type="train",
    )


def reply_message(node: int, content: RecordDict) -> Message:
    """A reply from node ``node`` to the server carrying ``content``."""
    return Message(content=content, metadata=metadata(node, 0, reply_to="x"))
