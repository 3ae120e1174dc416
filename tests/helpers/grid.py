"""A grid whose nodes' ClientApps run in the test's process: the real ServerApp body
(server.app.run_server) drives real ClientApp training, deterministically (each client's RNG seeded
by node and round, replies in node order). Shared by the resume and privacy-unit tests."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import torch
from flwr.app import Message

from fedlora.client.app import handle_train
from fedlora.common import protocol as P
from fedlora.common.config import FedloraConfig
from fedlora.server.app import ServerSettings, run_server
from fedlora.simulations.virtual_client import simulation_setup

NODES = (101, 202)


class Crash(Exception):
    """The coordinator dies while sending a round."""


class InProcessGrid:
    """Nodes whose ClientApp runs here: node ``NODES[i]`` serves partition ``i``."""

    def __init__(
        self,
        cfg: FedloraConfig,
        run_dir: Path,
        crash_in_round: int | None = None,
        canaries: tuple[int, int] | None = None,
    ) -> None:
        self.setups = {
            node: simulation_setup(cfg, run_dir, SimpleNamespace(node_config={P.PARTITION_ID: i}), canaries)
            for i, node in enumerate(NODES)
        }
        self.crash_in_round = crash_in_round

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            absolute = int(msg.content[P.CONFIG][P.ROUND])
            if absolute == self.crash_in_round:
                raise Crash(f"killed in round {absolute}")
            node = msg.metadata.dst_node_id
            torch.manual_seed(node * 1000 + absolute)
            replies.append(handle_train(msg, self.setups[node]))
        return replies


def run(
    cfg: FedloraConfig,
    run_dir: Path,
    crash_in_round: int | None = None,
    canaries: tuple[int, int] | None = None,
) -> None:
    """``canaries``: each node's (white-box, black-box) audit canaries, as ``fedlora-simulate --audit``."""
    grid = InProcessGrid(cfg, run_dir, crash_in_round, canaries)
    run_server(grid, ServerSettings(cfg=cfg, run_dir=run_dir, num_clients=len(NODES)))
