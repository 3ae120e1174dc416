"""A virtual institution's identity, resolved inside the Ray actor that serves it.

Kept apart from `run` so that what the actors unpickle (this module's function) imports only the
client side, not the ServerApp, the strategies or Flower's simulation engine.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context

from fedlora.client.app import ClientSetup, with_rank
from fedlora.common import protocol as P
from fedlora.common.config import FedloraConfig


def simulation_setup(cfg: FedloraConfig, run_dir: Path, context: Context) -> ClientSetup:
    """Virtual institution ``partition-id``: its slice of the data, its rank, its own ledger."""
    pid = int(context.node_config[P.PARTITION_ID])
    ranks = cfg.simulation.client_ranks
    own = with_rank(cfg, ranks[pid]) if ranks else cfg
    return ClientSetup(
        cfg=own,
        client_id=pid,
        ledger_path=run_dir / "ledgers" / f"client-{pid}.json",
        partition=pid,
        audit_path=run_dir / "audit" / f"client-{pid}.jsonl",
    )
