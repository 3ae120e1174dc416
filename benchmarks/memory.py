"""Memory per round: does a long simulation hold each client process's memory flat?

Two engines run the same ClientApp:
- ray (default): the real simulation, fedlora's ServerApp and ClientApp on Flower's Ray backend;
  after each round, the RSS of every Ray actor serving virtual clients;
- in-process: the ClientApp called here, for every client every round, with the train message the
  coordinator sends (the initial global adapter); after each round, this process's RSS and its live
  tensor bytes (every storage a Python tensor object still reaches, garbage that waits for the
  collector included: memory the process holds all the same). `simulate` sets glibc's
  MALLOC_MMAP_THRESHOLD_ for its actors; for this process, set it before starting Python to match.
Round 1 loads the model and data and warms the allocators, so the figure is the last round over
round 2, per process; the target is at most 1.10.

    python -m benchmarks memory [--model minilm] [--clients 4] [--rounds 20]
        [--steps 3] [--engine ray|in-process] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import psutil
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks import PROG
from fedlora.client.app import build_client_app, shared_data
from fedlora.common import protocol as P
from fedlora.common.adapter import adapter_state, to_record
from fedlora.common.cli_support import (
    add_config_arguments,
    add_out_argument,
    console,
    read_config,
    report,
    run_cli,
    run_folder,
)
from fedlora.common.config import FedloraConfig
from fedlora.common.errors import FedloraError
from fedlora.common.model import BuiltModel, build_model, lora_scale
from fedlora.simulations.cli import default_config
from fedlora.simulations.run import prepare_run_dir, simulate
from fedlora.simulations.virtual_client import simulation_setup

MB = 2**20
TARGET = 1.10
ACTOR = "ClientAppActor"  # the process title Ray gives the workers that host Flower's ClientApps

# round -> {process label: MB}
Figures = dict[int, dict[str, float]]
RoundHook = Callable[[int, dict[str, float]], None]


def live_tensor_bytes() -> int:
    """Bytes of every distinct storage behind a tensor the garbage collector tracks: what this
    process's tensors hold, reachable or waiting for collection."""
    storages = {}
    for obj in gc.get_objects():
        # type(), not isinstance: isinstance asks proxies for __class__, and torch's deprecated aliases warn.
        if issubclass(type(obj), torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def actor_rss() -> dict[str, float]:
    """RSS of each Ray actor hosting ClientApps, found among this process's descendants."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if ACTOR in " ".join(proc.cmdline()):
                found[f"actor {proc.pid}"] = proc.memory_info().rss / MB
        except psutil.Error:
            continue
    return found


def train_message(cfg: FedloraConfig, built: BuiltModel, server_round: int, node: int) -> Message:
    """The coordinator's train message to ``node``: the initial global adapter at its rank."""
    config = {
        P.FINGERPRINT: built.fingerprint,
        P.LORA_R: cfg.model.lora_r,
        P.LORA_SCALE: lora_scale(cfg.model),
        P.ROUND: server_round,
    }
    content = RecordDict({P.ARRAYS: to_record(adapter_state(built.model)), P.CONFIG: ConfigRecord(config)})
    metadata = Metadata(
        run_id=1,
        message_id=f"train-{server_round}-{node}",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=3600,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)


def in_process(cfg: FedloraConfig, run_dir: Path, on_round: RoundHook | None = None) -> Figures:
    """Every virtual client's train messages through the simulation's ClientApp, in this process."""
    prepare_run_dir(cfg, run_dir)
    tokenizer, bundle = shared_data(cfg)
    built = build_model(cfg.model, bundle.labels, len(tokenizer))
    app = build_client_app(partial(simulation_setup, cfg, run_dir))
    clients = cfg.simulation.num_clients
    figures: Figures = {}
    for server_round in range(1, cfg.federation.rounds + 1):
        for pid in range(clients):
            node_config = {P.PARTITION_ID: pid, P.NUM_PARTITIONS: clients}
            context = Context(1, pid + 1, node_config, RecordDict(), {})
            reply = app(train_message(cfg, built, server_round, pid + 1), context)
            if reply.has_error():
                raise RuntimeError(f"round {server_round}, client {pid}: {reply.error.reason}")
        figures[server_round] = {
            "process RSS": psutil.Process().memory_info().rss / MB,
            "live tensors": live_tensor_bytes() / MB,
        }
        if on_round is not None:
            on_round(server_round, figures[server_round])
    return figures


def with_ray(cfg: FedloraConfig, run_dir: Path, on_round: RoundHook | None = None) -> Figures:
    """The real simulation; each actor's RSS once the round's replies are in."""
    figures: Figures = {}

    def measure(entry: dict) -> None:
        figures[entry["round"]] = actor_rss()
        if on_round is not None:
            on_round(entry["round"], figures[entry["round"]])

    simulate(cfg, run_dir, on_round=measure)
    return figures


def growth(figures: Figures) -> dict[str, float]:
    """Per process: the last round's figure over round 2's (round 1 warms up)."""
    last = figures[max(figures)]
    second = figures.get(2, {})
    return {name: last[name] / second[name] for name in last if second.get(name)}


def table(figures: Figures, title: str) -> Table:
    names = sorted({name for row in figures.values() for name in row})
    t = Table(title=title)
    t.add_column("round")
    for name in names:
        t.add_column(f"{name} (MB)", justify="right")
    for server_round, row in sorted(figures.items()):
        t.add_row(str(server_round), *[f"{row[n]:.0f}" if n in row else "-" for n in names])
    ratios = growth(figures)
    t.add_row(f"{max(figures)} / 2", *[f"{ratios[n]:.3f}" if n in ratios else "-" for n in names])
    return t


def config(args: argparse.Namespace) -> FedloraConfig:
    overrides = [
        f"model.source={args.model}",
        f"simulation.num_clients={args.clients}",
        f"federation.min_clients={args.clients}",
        f"federation.rounds={args.rounds}",
        f"training.local_steps={args.steps}",
        "federation.fraction_evaluate=0",
        "federation.central_eval=false",
        *args.set,
    ]
    return read_config(args.config or default_config(), overrides)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} memory", description=__doc__)
    add_config_arguments(ap, "simulation", "the packaged hospitals.yaml")
    ap.add_argument("--model", default="minilm", help="model.source (default minilm)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=3, help="training.local_steps")
    ap.add_argument("--engine", choices=("ray", "in-process"), default="ray")
    add_out_argument(ap, "the simulation's run folder")
    return ap


def run(args: argparse.Namespace) -> int:
    if args.rounds < 3:
        raise FedloraError(f"--rounds: {args.rounds}; at least 3 (the ratio is the last round over round 2)")
    cfg = config(args)
    engine = with_ray if args.engine == "ray" else in_process
    columns = (TextColumn("round"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[mb]}"))
    with Progress(*columns, TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("rounds", total=args.rounds, mb="-")

        def show(server_round: int, row: dict[str, float]) -> None:
            shown = ", ".join(f"{name} {mb:.0f} MB" for name, mb in sorted(row.items()))
            bar.console.print(f"round {server_round}: {shown}")
            bar.update(task, completed=server_round, mb=shown)

        figures = engine(cfg, run_folder(args.out, f"{cfg.name}-memory"), show)
    title = (
        f"{args.engine}: {cfg.model.source}, {args.clients} clients x {args.rounds} rounds, "
        f"{args.steps} steps, DP {'on' if cfg.privacy.enabled else 'off'}"
    )
    report.print(table(figures, title))
    worst = max(growth(figures).values(), default=float("nan"))
    report.print(f"largest last/round-2 ratio {worst:.3f} (target <= {TARGET:.2f})")
    return 0 if worst <= TARGET else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: run(args))
