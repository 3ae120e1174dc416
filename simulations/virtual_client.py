"""A virtual institution's identity, resolved inside the Ray actor that serves it.

Kept apart from `run` so that what the actors unpickle (this module's function) imports only the
client side, not the ServerApp, the strategies or Flower's simulation engine.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flwr.app import Context

from fedlora.client.app import ClientSetup, with_rank
from fedlora.common import protocol as P
from fedlora.common.config import FedloraConfig
from fedlora.simulations.canary_rounds import CanaryPlan, CanaryRound
from fedlora.simulations.identities import own_identity
from fedlora.simulations.partitions import simulation_partitions


def partition_sizes(cfg: FedloraConfig) -> list[int]:
    """Each virtual institution's training rows. Raises the partition's one-line DataError, so that a
    run refuses before Ray starts what every actor would otherwise fail on at every message."""
    trains, _ = simulation_partitions(cfg)
    return [len(rows) for rows in trains]


def with_peers(cfg: FedloraConfig) -> FedloraConfig:
    """``cfg`` with training.peers_per_round, left at 1, set to the institutions a simulated round
    averages (num_clients x fraction_train, at least min_clients), which the planner weighs."""
    if cfg.training.peers_per_round != 1:
        return cfg
    sim, fed = cfg.simulation, cfg.federation
    peers = min(sim.num_clients, max(int(sim.num_clients * fed.fraction_train), fed.min_clients))
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, peers_per_round=peers))


def canary_file(run_dir: Path, pid: int) -> Path:
    return run_dir / "canaries" / f"client-{pid}.json"


def ledger_file(run_dir: Path, pid: int) -> Path:
    return run_dir / "ledgers" / f"client-{pid}.json"


def simulation_setup(
    cfg: FedloraConfig, run_dir: Path, context: Context, canaries: tuple[int, int] | None = None
) -> ClientSetup:
    """Virtual institution ``partition-id``: its slice of the data, its rank, its own ledger, its
    identity key (simulations.identities); with ``canaries`` (white-box, black-box counts), its own
    privacy-audit canaries."""
    pid = int(context.node_config[P.PARTITION_ID])
    ranks = cfg.simulation.client_ranks
    own = own_identity(with_rank(cfg, ranks[pid]) if ranks else cfg, pid)
    trains, evals = simulation_partitions(cfg)
    return ClientSetup(
        cfg=own,
        client_id=pid,
        ledger_path=ledger_file(run_dir, pid),
        rows=(trains[pid], evals[pid] if evals else None),
        audit_path=run_dir / "audit" / f"client-{pid}.jsonl",
        observer=CanaryRound(CanaryPlan(canary_file(run_dir, pid), *canaries)) if canaries else None,
    )
