"""One researcher's run: the same ServerApp and ClientApp, many virtual institutions, one machine."""

from __future__ import annotations

import json
import logging
import os
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from flwr.simulation import run_simulation

from fedlora.client.app import build_client_app
from fedlora.common.config import FedloraConfig, dump_yaml, read_yaml
from fedlora.common.config_yaml import parse_yaml
from fedlora.common.errors import ConfigError, FedloraError
from fedlora.common.notices import DropNotices
from fedlora.server.app import RoundCallback, ServerSettings, build_server_app
from fedlora.simulations.carry import carried_setup, carry_mod, start_keeper
from fedlora.simulations.cluster import check_nodes, join_args, require_reachable, unreachable
from fedlora.simulations.gpu_share import check_gpu_share
from fedlora.simulations.head_round_audit import head_sum_recorder
from fedlora.simulations.identities import with_identities
from fedlora.simulations.secure_sum_audit import sum_recorder
from fedlora.simulations.virtual_client import partition_sizes, simulation_setup, with_peers

CONFIG_FILE = "config.yaml"
# What Flower and Ray say at the start of every simulation that is no news to a fedlora user:
# - run_simulation's deprecation. Kept on purpose: flwr 1.41 has no non-deprecated in-process entry
#   point; its replacement, `flwr run`, starts a SuperLink and loads the apps by reference in other
#   processes, where the round callback (progress, benchmarks' measurements) cannot reach.
# - fraction_evaluate 0: the default simulation evaluates centrally (federation.central_eval).
FLOWER_NOTICES = ("The `run_simulation` function is deprecated", "fraction_evaluate is set to 0.0")
# Ray's notice that it will stop hiding GPUs from actors with num_gpus 0: about a future version.
RAY_NOTICE = "Tip: In future versions of Ray, Ray will no longer override accelerator"
# What ray.init raises (a bare Exception, ray/_private/node.py) when its raylet has not registered with
# the GCS within 30 s (a constant in Ray 2.55).
RAY_START_TIMEOUT = "The current node timed out during startup"
RAY_START_SECONDS = 30
LOCAL_RAY = "local"
# A run may go on with more rounds, and on a cluster (or back on this machine).
RESUME_MAY_CHANGE = (("federation", "rounds"), ("simulation", "ray_address"))


def backend_config(cfg: FedloraConfig) -> dict:
    """Flower's Ray backend: Ray started on this machine with its CPUs, or the cluster at
    simulation.ray_address joined (its resources checked once joined: `joined_cluster`)."""
    sim = cfg.simulation
    resources = {"num_cpus": sim.client_cpus, "num_gpus": sim.client_gpus}
    if sim.ray_address:
        return {"client_resources": resources, "init_args": join_args(sim.ray_address)}
    cpus = os.cpu_count() or 1
    if sim.client_cpus > cpus:
        raise ConfigError(f"simulation.client_cpus: {sim.client_cpus} exceeds this machine's {cpus} CPUs")
    return {
        "client_resources": resources,
        # logging_level: Flower's run_simulation default, given here because start_ray starts Ray
        # before it (else Ray's INFO lines reach the console).
        "init_args": {
            # "local": a Ray of its own, even where a cluster started by `ray start` (someone else's)
            # runs on this machine: ray.init without an address would join the latest one.
            "address": LOCAL_RAY,
            "num_cpus": cpus,
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": "WARNING",
        },
    }


def prepare_run_dir(cfg: FedloraConfig, run_dir: Path) -> None:
    """A run folder holds one config: resuming with a different one would mix two experiments."""
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / CONFIG_FILE
    text = dump_yaml(cfg, "simulation")
    if saved.exists():
        before = read_yaml(saved)
        now = parse_yaml(text)
        for section, key in RESUME_MAY_CHANGE:
            before[section].pop(key, None)
            now[section].pop(key, None)
        if before != now:
            raise ConfigError(
                f"{saved}: this run folder was started with another config (only federation.rounds and "
                "simulation.ray_address may change on resume); use a new --out folder"
            )
    saved.write_text(text)


@contextmanager
def quiet_simulation() -> Iterator[None]:
    """For one simulation: Flower's warnings and errors once (Opacus gives the root logger a handler on
    import, which printed each of Flower's records a second time), without the notices above; glibc
    returns freed tensor buffers of 128 KiB or more to the OS in the Ray actors started meanwhile
    (by default it raises that threshold after the first free and keeps each round's peak on its heap:
    README, "Memory per round"). Everything is restored afterwards."""
    flwr, drop = logging.getLogger("flwr"), DropNotices(*FLOWER_NOTICES)
    level, propagate = flwr.level, flwr.propagate
    malloc = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    flwr.setLevel(logging.WARNING)
    flwr.propagate = False
    flwr.addFilter(drop)
    if malloc is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=RAY_NOTICE, category=FutureWarning)
            yield
    finally:
        flwr.removeFilter(drop)
        flwr.setLevel(level)
        flwr.propagate = propagate
        if malloc is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)


def simulate(
    cfg: FedloraConfig,
    run_dir: Path,
    on_round: RoundCallback | None = None,
    canaries: tuple[int, int] | None = None,
) -> None:
    """Run (or resume) a simulation into ``run_dir``; with ``canaries`` (white-box, black-box counts)
    every virtual institution inserts privacy-audit canaries in its own trainer (and under secure
    aggregation round 0's and the head rounds' unmasked sums are kept for the audit of their noise)."""
    if canaries and cfg.simulation.client_ranks:
        raise ConfigError("--audit: simulation.client_ranks is set; the audit needs one rank for all clients")
    partition_sizes(cfg)
    cfg = with_peers(cfg)
    prepare_run_dir(cfg, run_dir)
    cfg = with_identities(cfg, run_dir)
    audited = bool(canaries) and cfg.federation.secure_aggregation
    settings = ServerSettings(
        cfg=cfg,
        run_dir=run_dir,
        num_clients=cfg.simulation.num_clients,
        on_secure_sum=sum_recorder(run_dir) if audited else None,
        on_secure_head=head_sum_recorder(run_dir) if audited else None,
    )
    server_app = build_server_app(lambda _context: settings, on_round)
    backend = backend_config(cfg)
    with quiet_simulation():
        start_ray(backend)
        checked_before_round_one(cfg)
        if cfg.simulation.ray_address:
            scratch = f"fedlora-{uuid.uuid4().hex[:12]}"
            setup = partial(carried_setup, cfg, scratch, canaries=canaries)
            client_app = build_client_app(setup, outer=carry_mod(start_keeper(run_dir), scratch))
        else:
            client_app = build_client_app(partial(simulation_setup, cfg, run_dir, canaries=canaries))
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.simulation.num_clients,
            backend_config=backend,
        )
    check_something_trained(run_dir)


def start_ray(backend: dict) -> None:
    """Ray started as Flower's Ray backend starts it (which then finds it running), before Flower's
    simulation starts the ServerApp: a Ray that does not start in time (a loaded machine) is one line
    with what to do, not pages of tracebacks followed by a ServerApp waiting round_timeout for replies
    that cannot come."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend  # imports Ray: only here

    address = backend["init_args"].get("address")
    if address != LOCAL_RAY:
        require_reachable(address)
    try:
        RayBackend(backend)
    except Exception as err:
        if address != LOCAL_RAY and isinstance(err, ConnectionError | TimeoutError):
            raise unreachable(address, err) from None
        if RAY_START_TIMEOUT not in str(err):
            raise
        raise FedloraError(
            f"Ray did not start within its fixed {RAY_START_SECONDS} s (is the machine loaded?); nothing "
            "was trained: retry the same command when the machine is less busy (it resumes in --out)"
        ) from None


def checked_before_round_one(cfg: FedloraConfig) -> None:
    """The GPU share, and on a cluster its nodes; a refusal leaves the cluster (Flower's simulation,
    which would, does not start)."""
    import ray

    try:
        check_gpu_share(cfg)
        if cfg.simulation.ray_address:
            check_nodes(cfg)
    except BaseException:
        ray.shutdown()
        raise


def check_something_trained(run_dir: Path) -> None:
    """A run in which every reply of every round was dropped trained nothing: an error, not a result.
    Round 0's statistics count: the shared head built from them is a result."""
    path = run_dir / "history.json"
    rounds = [entry for entry in json.loads(path.read_text()) if "round" in entry]
    if not rounds or any(entry.get("clients") for entry in rounds):
        return
    dropped = [d for entry in rounds for d in entry.get("dropped", [])]
    first = f"; the first: node {dropped[0].get('node')}: {dropped[0].get('reason')}" if dropped else ""
    raise FedloraError(
        f"no round aggregated anything: all {len(dropped)} replies of the {len(rounds)} rounds were "
        f"dropped, the adapter is untrained{first} (see {path})"
    )
