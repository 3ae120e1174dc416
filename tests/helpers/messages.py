"""Flower message metadata for hand-built messages (Message() outside a run needs it explicitly), and
the coordinator's train message for a config."""

from __future__ import annotations

import itertools
import time

from flwr.app import ConfigRecord, Message, Metadata, RecordDict

from fedlora.client.app import shared_data
from fedlora.common import protocol as P
from fedlora.common.adapter import adapter_state, to_record
from fedlora.common.config import FedloraConfig
from fedlora.common.model import build_model, lora_scale

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


def train_message(cfg: FedloraConfig, server_round: int) -> Message:
    """The coordinator's train message for ``server_round``: the fresh global adapter at the config's
    layout, from the server (node 0) to node 1."""
    tokenizer, bundle = shared_data(cfg)
    built = build_model(cfg.model, bundle.labels, len(tokenizer))
    config = ConfigRecord(
        {
            P.FINGERPRINT: built.fingerprint,
            P.LORA_R: cfg.model.lora_r,
            P.LORA_SCALE: lora_scale(cfg.model),
            P.ROUND: server_round,
        }
    )
    return Message(
        content=RecordDict({P.ARRAYS: to_record(adapter_state(built.model)), P.CONFIG: config}),
        metadata=metadata(0, 1),
    )
