"""The coordinator's side of secure round 0 when institutions vanish: each stage's replies attributed to
the node they are about (the SuperLink answers for an unavailable node as node 1), silent nodes
recorded, and the stages held to one round_timeout; the LoRA rounds after it tolerate the dropouts."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

from fedlora.common import protocol as P
from fedlora.common.config import load_config
from fedlora.common.errors import FedloraError, RoundDiscarded
from fedlora.server import secure_statistics as secure
from fedlora.server import strategy
from fedlora.server.strategy import build_strategy


@pytest.fixture(autouse=True)
def _inside_a_serverapp(monkeypatch) -> None:
    for attribute in ("_run_id", "_node_id", "_task_id"):  # Message() as inside a ServerApp process
        monkeypatch.setattr(TaskIdentity, attribute, 1)


class VanishingGrid:
    """Node 11 answers, node 12 was killed (the SuperLink's 'node unavailable' comes back for it), node
    13 stays silent; messages get their ids as Flower's grid gives them when it pushes them."""

    def __init__(self) -> None:
        self.ttls: list[float] = []

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as flwr's grid does on push
            self.ttls.append(msg.metadata.ttl)
            node = msg.metadata.dst_node_id
            if node == 11:
                replies.append(Message(RecordDict({P.CONFIG: ConfigRecord({"ok": 1})}), reply_to=msg))
            elif node == 12:
                replies.append(create_message_error_unavailable_res_message(msg.metadata, "node_unavail"))
        return replies


def test_a_vanished_node_is_dropped_under_its_own_id_and_a_silent_one_is_recorded() -> None:
    exchange = secure.Exchange(VanishingGrid(), ConfigRecord(), timeout=30)
    parsed = exchange(P.UNMASK, [11, 12, 13], lambda content: dict(content[P.CONFIG]))
    assert parsed == {11: {"ok": 1}}
    dropped = {d["node"]: d["reason"] for d in exchange.record.dropped}
    assert set(dropped) == {12, 13}  # not node 1, the SuperLink's id
    assert dropped[12].startswith("node unavailable")
    assert dropped[13].startswith(f"no {P.UNMASK} reply within")


def test_the_stages_share_the_round_timeout(monkeypatch) -> None:
    readings = [100.0, 110.0, 140.0]  # built; first stage 10 s later; second stage after the deadline
    monkeypatch.setattr(time, "monotonic", lambda: readings.pop(0) if len(readings) > 1 else readings[0])
    grid = VanishingGrid()
    exchange = secure.Exchange(grid, ConfigRecord(), timeout=30)
    exchange(P.ADVERTISE_KEYS, [11], lambda content: None)
    assert grid.ttls == [20.0]  # what is left of the round, not a fresh round_timeout per stage
    with pytest.raises(RoundDiscarded, match=r"round_timeout \(30 s\) ran out before the share-keys"):
        exchange(P.SHARE_KEYS, [11], lambda content: None)


class TwoNodes:
    def get_node_ids(self) -> list[int]:
        return [11, 12]


def test_the_lora_rounds_after_a_secure_round_0_go_on_without_the_tolerated_dropouts(monkeypatch) -> None:
    """Three institutions, one tolerated dropout: round 0 waits for all three, round 1 goes on with two."""
    monkeypatch.setattr(strategy, "NODE_POLL_SECONDS", 0.01)
    base = ["federation.min_clients=3", "federation.secagg_threshold=2", "federation.node_wait_timeout=0.2"]
    secure_on = ["federation.secure_aggregation=true", "federation.secagg_dropouts=1"]
    lora = build_strategy(load_config(overrides=[*base, *secure_on]), "fp", num_clients=3)
    arrays = ArrayRecord({"w": torch.zeros(2)})
    assert len(list(lora.configure_train(1, arrays, ConfigRecord(), TwoNodes()))) == 2
    with pytest.raises(FedloraError, match=r"round 0: only 2 of the 3 nodes"):
        lora.statistics_nodes(TwoNodes())
    plain = build_strategy(load_config(overrides=base), "fp", num_clients=3)
    with pytest.raises(FedloraError, match=r"round 1: only 2 of the 3 nodes"):
        plain.configure_train(1, arrays, ConfigRecord(), TwoNodes())
