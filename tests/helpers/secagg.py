"""A grid whose three institutions' ClientApps (audit and failure mods, client.secure_statistics) run in
the test's process, each with a context kept across messages as Flower keeps it: the real server body
of round 0 under secure aggregation (server.secure_statistics) drives them. It records every reply the
coordinator receives, and can lose a node's reply at a stage (a dropout). Shared by the secure
statistics and secure-sum audit tests."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora.client.app import build_client_app
from fedlora.common import protocol as P
from fedlora.common.config import FedloraConfig
from fedlora.simulations.identities import with_identities
from fedlora.simulations.virtual_client import simulation_setup

NODES = (101, 102, 103)


def inside_a_serverapp(monkeypatch) -> None:
    """Message() as inside a ServerApp process (an autouse fixture of the tests that build messages)."""
    for attribute in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)


class SecAggGrid:
    """Three institutions whose ClientApp runs here, each with its identity key and the run's roster
    (simulations.identities, as a simulation gives them); ``lost``: (stage, node) whose reply never
    arrives; ``canaries``: each one's audit canaries (white-box, black-box), as
    ``fedlora-simulate --audit``."""

    def __init__(
        self,
        cfg: FedloraConfig,
        run_dir: Path,
        lost: Iterable[tuple[str, int]] = (),
        canaries: tuple[int, int] | None = None,
    ) -> None:
        cfg = with_identities(cfg, run_dir)
        self.setups = {
            node: simulation_setup(cfg, run_dir, SimpleNamespace(node_config={P.PARTITION_ID: i}), canaries)
            for i, node in enumerate(NODES)
        }
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
            for node in NODES
        }
        self.lost = set(lost)
        self.received: list[Message] = []
        self.stages: list[str | None] = []

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            stage = msg.content[P.CONFIG].get(P.SECAGG_STAGE)
            self.stages.append(stage)
            app = build_client_app(lambda _context, setup=self.setups[node]: setup)
            reply = app(msg, self.contexts[node])
            if (stage, node) not in self.lost:
                replies.append(reply)
        self.received.extend(replies)
        return replies
