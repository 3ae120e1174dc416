"""Many institutions on one machine: client updates per minute and memory, fedlora vs bare Flower.

For each number of institutions (default 10, 100 and 1,000), two simulations run one after the other
in this process on the same Ray backend, sampling the same number of institutions per round (bare
Flower for more rounds, below):
- bare Flower, echo: Flower's FedAvg and a ClientApp that sends back the arrays it receives (no torch
  in the client), carrying fedlora's adapter tensors;
- fedlora: its own apps with training and DP on (tiny BERT by default; MedMCQA subjects, IID, so that
  1,000 institutions each hold a few rows): model, Opacus, ledger reserved and fsynced, audit log,
  reply screen, aggregation, checkpoint. Central evaluation is off on both sides: it is a cost per
  round, not per update.
Round 1 pays the start (Ray, the actors' imports, data and model loading), so rates are counted over
the rounds after it: updates per minute, and the fixed cost per update, the actors' seconds (all of
them busy while a round runs) less the seconds the trainers measured in their DP steps (the real
work, shown apart), per update. Flower's simulation hands messages over and collects replies in
steps of a tenth of a second (its in-memory grid's pull interval), so a bare round lasts one or two
steps: bare Flower runs at least BARE_ROUNDS rounds, enough to resolve its mean. The whole run's
seconds per update, start included, are beside them.
Memory: the total RSS of this process and every descendant (Ray's daemons and its workers), sampled
every second; the peak over each run. Goals: fedlora's fixed cost per update at most 3x bare
Flower's; peak memory flat in the number of institutions.

    python -m benchmarks scale [CONFIG] [--set K=V] [--institutions 10 100 1000]
        [--sampled 20] [--rounds 6] [--model tiny-bert]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import psutil
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from rich.table import Table

from benchmarks import PROG
from benchmarks.bare_flower import echo_app
from fedlora.common import protocol as P
from fedlora.common.adapter import adapter_state
from fedlora.common.cli_support import add_config_arguments, console, read_config, report, run_cli
from fedlora.common.config import FedloraConfig
from fedlora.common.errors import ConfigError
from fedlora.common.workbench import prepare
from fedlora.simulations.run import backend_config, quiet_simulation, simulate

MB = 2**20
TARGET_RATIO = 3.0  # fedlora's fixed cost per update over bare Flower's, at most
TARGET_GROWTH = 1.25  # peak memory at the most institutions over the fewest, at most
BARE_ROUNDS = 40  # bare Flower's rounds at least (each a tenth or two of a second)
SAMPLE_SECONDS = 1.0


def tree_rss() -> float:
    """MB resident in this process and all its descendants (Ray's daemons and workers included)."""
    total = psutil.Process().memory_info().rss
    for proc in psutil.Process().children(recursive=True):
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total / MB


@contextmanager
def peak_rss() -> Iterator[list[float]]:
    """The process tree's peak RSS while the block runs, in the one-element list it yields."""
    peak, stop = [tree_rss()], threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_SECONDS):
            peak[0] = max(peak[0], tree_rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], tree_rss())


@dataclass(frozen=True)
class Run:
    """One simulation: when each round ended (seconds from the start), its updates, the seconds its
    clients spent in DP steps (the trainer's own clock), the actors serving them, the peak MB."""

    ends: tuple[float, ...]
    updates: tuple[int, ...]
    training: tuple[float, ...]
    actors: int
    peak_mb: float

    @property
    def per_minute(self) -> float:
        """Client updates per minute after round 1 (which pays Ray's and the actors' start)."""
        if len(self.ends) < 2:
            return float("nan")
        return 60 * sum(self.updates[1:]) / (self.ends[-1] - self.ends[0])

    @property
    def fixed_cost(self) -> float:
        """Actor-seconds per update after round 1 that are not DP steps: the actors' time (all busy
        while a round runs) less what the trainers measured in their steps."""
        if len(self.ends) < 2:
            return float("nan")
        busy = self.actors * (self.ends[-1] - self.ends[0])
        return (busy - sum(self.training[1:])) / sum(self.updates[1:])

    @property
    def whole_run(self) -> float:
        """Seconds per update over the whole run, Ray's start and round 1 included."""
        return self.ends[-1] / sum(self.updates) if self.ends else float("nan")


class RoundClock:
    """When each round ended, how many updates it aggregated and their seconds of DP steps."""

    def __init__(self, actors: int) -> None:
        self.actors = actors
        self.start = time.perf_counter()
        self.ends: list[float] = []
        self.updates: list[int] = []
        self.training: list[float] = []

    def tick(self, updates: int, training: float = 0.0) -> None:
        self.ends.append(time.perf_counter() - self.start)
        self.updates.append(updates)
        self.training.append(training)
        at, mb = self.ends[-1], tree_rss()
        console.print(f"  round {len(self.ends)}: {updates} updates at {at:.1f} s, {mb:.0f} MB in all")

    def run(self, peak_mb: float) -> Run:
        return Run(tuple(self.ends), tuple(self.updates), tuple(self.training), self.actors, peak_mb)


def actors(cfg: FedloraConfig) -> int:
    """How many Ray actors serve clients at once: the CPUs Ray is given (on a cluster,
    simulation.ray_address: each node's) over each client's share."""
    resources = backend_config(cfg)
    share = resources["client_resources"]["num_cpus"]
    if "num_cpus" in resources["init_args"]:
        return int(resources["init_args"]["num_cpus"] // share)
    import ray

    ray.init(**resources["init_args"])
    try:
        return sum(int(node["Resources"].get("CPU", 0) // share) for node in ray.nodes() if node["Alive"])
    finally:
        ray.shutdown()


def bare_flower(cfg: FedloraConfig, arrays: ArrayRecord) -> Run:
    """Flower's FedAvg and the echo app, sampling as fedlora does (fraction_train, min_clients)."""
    n, fed = cfg.simulation.num_clients, cfg.federation
    clock = RoundClock(actors(cfg))
    server = ServerApp()

    @server.main()
    def main(grid: Grid, _context: Context) -> None:
        strategy = FedAvg(
            fraction_train=fed.fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=fed.min_clients,
            min_available_nodes=n,
        )

        def after(server_round: int, _arrays: ArrayRecord) -> MetricRecord | None:
            if server_round:
                clock.tick(max(int(n * fed.fraction_train), fed.min_clients))
            return None

        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=fed.rounds, evaluate_fn=after)

    with peak_rss() as peak, quiet_simulation():
        run_simulation(server, echo_app(), num_supernodes=n, backend_config=backend_config(cfg))
    return clock.run(peak[0])


def fedlora(cfg: FedloraConfig) -> Run:
    clock = RoundClock(actors(cfg))

    def after(entry: dict) -> None:
        clients = entry.get("clients", [])
        clock.tick(len(clients), sum(c.get(P.TRAIN_SECONDS, 0.0) for c in clients))

    with tempfile.TemporaryDirectory() as out, peak_rss() as peak:
        simulate(cfg, Path(out), on_round=after)
    return clock.run(peak[0])


def config(args: argparse.Namespace, institutions: int, rounds: int | None = None) -> FedloraConfig:
    """The benchmark's simulation at ``institutions``: ``--sampled`` of them train each round, for
    ``rounds`` (default ``--rounds``)."""
    sampled = min(args.sampled, institutions)
    overrides = [
        f"model.source={args.model}",
        "simulation.partition=iid",
        f"simulation.num_clients={institutions}",
        f"federation.min_clients={sampled}",
        f"federation.fraction_train={sampled / institutions}",
        f"federation.rounds={rounds or args.rounds}",
        "federation.fraction_evaluate=0",
        "federation.central_eval=false",
        *args.set,
    ]
    return read_config(args.config or str(files("fedlora.configs.simulation") / "medmcqa.yaml"), overrides)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} scale", description=__doc__)
    add_config_arguments(ap, "simulation", "the packaged medmcqa.yaml")
    ap.add_argument("--institutions", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--sampled", type=int, default=20, help="institutions trained per round (default 20)")
    ap.add_argument(
        "--rounds", type=int, default=6, help=f"rounds, at least 2 (default 6; bare Flower: {BARE_ROUNDS}+)"
    )
    ap.add_argument("--model", default="tiny-bert", help="model.source (default tiny-bert)")
    return ap


def check(args: argparse.Namespace) -> None:
    if args.rounds < 2:
        raise ConfigError(f"--rounds: {args.rounds}; at least 2 (round 1 pays the start and is not counted)")
    if min(args.institutions) < 1:
        raise ConfigError(f"--institutions: {min(args.institutions)}; each count at least 1")
    if args.sampled < 1:
        raise ConfigError(f"--sampled: {args.sampled}; at least 1")


def table(results: dict[int, dict[str, Run]], title: str) -> Table:
    t = Table(title=title)
    columns = ("institutions", "app", "updates/min", "fixed actor-s/update", "x bare", "DP steps s/update",
               "whole run s/update", "peak RSS MB")  # fmt: skip
    for column in columns:
        t.add_column(column, justify="right")
    for n, runs in results.items():
        bare = runs["bare Flower"]
        for name, run in runs.items():
            steps = sum(run.training[1:]) / sum(run.updates[1:])
            t.add_row(str(n), name, f"{run.per_minute:.0f}", f"{run.fixed_cost:.3f}",
                      f"{run.fixed_cost / bare.fixed_cost:.1f}", f"{steps:.3f}", f"{run.whole_run:.3f}",
                      f"{run.peak_mb:.0f}")  # fmt: skip
    return t


def measure(args: argparse.Namespace) -> int:
    check(args)
    results: dict[int, dict[str, Run]] = {}
    bare_rounds = max(args.rounds, BARE_ROUNDS)
    for n in args.institutions:
        cfg = config(args, n)
        arrays = ArrayRecord(adapter_state(prepare(cfg).built.model))
        console.print(f"{n} institutions, bare Flower:")
        results[n] = {"bare Flower": bare_flower(config(args, n, bare_rounds), arrays)}
        console.print(f"{n} institutions, fedlora:")
        results[n]["fedlora"] = fedlora(cfg)
    title = (
        f"{args.model}, DP training on; {args.sampled} institutions sampled per round (all, where fewer); "
        f"rates over rounds 2..{args.rounds} (bare Flower: 2..{bare_rounds})"
    )
    report.print(table(results, title))
    ratios = [r["fedlora"].fixed_cost / r["bare Flower"].fixed_cost for r in results.values()]
    peaks = [r["fedlora"].peak_mb for r in results.values()]
    growth = max(peaks) / min(peaks)
    report.print(
        f"fedlora's fixed cost per update over bare Flower's: worst {max(ratios):.2f}x "
        f"(target <= {TARGET_RATIO:g}x); fedlora's peak RSS, most institutions over fewest: {growth:.2f} "
        f"(target <= {TARGET_GROWTH:g})"
    )
    return 0 if max(ratios) <= TARGET_RATIO and growth <= TARGET_GROWTH else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: measure(args))
