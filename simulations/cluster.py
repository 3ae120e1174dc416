"""A simulation on a Ray cluster that already runs (`simulation.ray_address`): what it needs of it.

Ray schedules the virtual institutions across its nodes; fedlora checks, after joining and before
round 1, what Ray would otherwise turn into actors that never start or fail at every message: a node
that can host an institution (its CPUs, its GPU share), and on every such node, the data and the base
model at the paths the config names (read by each node itself: no hub download, no copying; every
node needs the same Python environment, the packaged model and data sets included).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from fedlora.common.config import FedloraConfig
from fedlora.common.errors import ConfigError, FedloraError
from fedlora.common.model import minilm_dir, model_dir

Resources = dict[str, float]
PROBE_SECONDS = 5.0


def join_args(address: str) -> dict:
    """ray.init's arguments to join the cluster at ``address`` (Flower's backend passes them on)."""
    return {"address": address, "log_to_driver": False, "logging_level": "WARNING"}


def unreachable(address: str, err: Exception) -> FedloraError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return FedloraError(
        f"simulation.ray_address: cannot join the Ray cluster at {address!r} ({first}); start it "
        "(ray start --head) or fix the address"
    )


def require_reachable(address: str) -> None:
    """Refuse, within seconds, a cluster address nothing answers at: ray.init would retry it for
    minutes, printing a warning every few seconds. ``auto`` is the address RAY_ADDRESS names (else
    Ray looks for a cluster started on this machine, and says at once when there is none)."""
    if address.startswith("ray://"):
        raise ConfigError(
            f"simulation.ray_address: {address!r} is a Ray Client address; run fedlora-simulate on a node "
            "of the cluster (the run folder stays on that node) and give the cluster's host:port"
        )
    target = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
    host, _, port = target.rpartition(":")
    if not target or target == "auto":
        return
    if not port.isdigit() or not host:
        raise ConfigError(f"simulation.ray_address: {target!r} is not host:port (nor auto)")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_SECONDS).close()
    except OSError as err:
        raise unreachable(target, err) from None


def hosts(cfg: FedloraConfig, nodes: list[Resources]) -> list[int]:
    """Which of the alive ``nodes`` (their Ray resources) can host one virtual institution; refused
    in one line when none can, naming the largest node."""
    sim = cfg.simulation
    if sim.client_gpus > 1 and sim.client_gpus != int(sim.client_gpus):
        raise ConfigError(f"simulation.client_gpus: {sim.client_gpus} above 1 must be a whole number of GPUs")
    fit = [
        i
        for i, node in enumerate(nodes)
        if node.get("CPU", 0) >= sim.client_cpus and node.get("GPU", 0) >= sim.client_gpus
    ]
    if not fit:
        cpus = max((node.get("CPU", 0) for node in nodes), default=0)
        gpus = max((node.get("GPU", 0) for node in nodes), default=0)
        raise ConfigError(
            f"simulation.client_cpus {sim.client_cpus:g}, client_gpus {sim.client_gpus:g}: no node of the "
            f"Ray cluster has them (its {len(nodes)} nodes have at most {cpus:g} CPUs, {gpus:g} GPUs)"
        )
    return fit


def node_paths(cfg: FedloraConfig) -> dict[str, str]:
    """What a virtual institution reads by path, by config key: its data files and the base model's
    folder (a tiny model built from a config still reads MiniLM's tokenizer)."""
    needed = {k: v for k, v in (("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)) if v}
    try:
        needed["model.source"] = str(model_dir(cfg.model.source) or minilm_dir())
    except FedloraError as err:  # the package is not installed on this node
        needed["model.source"] = f"{cfg.model.source} ({err})"
    return needed


def missing_here(cfg: FedloraConfig) -> dict[str, str]:
    """Run on a node: what of `node_paths` this node cannot see."""
    return {key: path for key, path in node_paths(cfg).items() if not Path(path).expanduser().exists()}


def check_nodes(cfg: FedloraConfig) -> None:
    """One Ray task pinned to each node that can host an institution checks the paths there; the first
    node missing one is refused in one line, before the ServerApp starts."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [node for node in ray.nodes() if node.get("Alive") and node.get("Resources")]
    chosen = [alive[i] for i in hosts(cfg, [node["Resources"] for node in alive])]
    check = ray.remote(missing_here)
    answers = ray.get(
        [
            check.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(cfg)
            for node in chosen
        ]
    )
    for node, missing in zip(chosen, answers, strict=True):
        if missing:
            key, path = next(iter(missing.items()))
            raise ConfigError(
                f"{key}: node {node['NodeManagerAddress']} ({node['NodeID'][:8]}) of the Ray cluster cannot "
                f"see {path}; every node that hosts institutions needs the data and model at the same path"
            )
