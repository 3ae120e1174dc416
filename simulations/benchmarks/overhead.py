"""fedlora's simulation overhead over bare Flower, training switched off on both sides.

Both runs use the same Ray backend, client count, rounds and tensors (the default config's adapter):
bare Flower's FedAvg with a ClientApp that echoes the arrays it receives, versus fedlora's apps
(model build, fingerprint check, validation, aggregation, checkpoint, audit) with local_steps 0
and no evaluation on either side.
Run alternately and repeated; prints each wall time and the median ratio.

    python -m fedlora.simulations.benchmarks.overhead [--clients 5] [--rounds 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from rich.table import Table

from fedlora.common.adapter import adapter_state
from fedlora.common.cli_support import console
from fedlora.common.config import FedloraConfig, load_config
from fedlora.common.workbench import prepare
from fedlora.simulations.cli import default_config
from fedlora.simulations.run import backend_config, simulate


def bare_flower(cfg: FedloraConfig, arrays: ArrayRecord) -> float:
    """A minimal Flower app exchanging the same tensors: no model, no checks, no files."""
    client = ClientApp()

    @client.train()
    def train(msg: Message, _context: Context) -> Message:
        reply = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})})
        return Message(content=reply, reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, _context: Context) -> None:
        n = cfg.simulation.num_clients
        strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=cfg.federation.rounds)

    start = time.perf_counter()
    run_simulation(
        server, client, num_supernodes=cfg.simulation.num_clients, backend_config=backend_config(cfg)
    )
    return time.perf_counter() - start


def fedlora_run(cfg: FedloraConfig) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        simulate(cfg, Path(out))
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    overrides = [
        "training.local_steps=0",
        "privacy.enabled=false",
        f"federation.rounds={args.rounds}",
        f"simulation.num_clients={args.clients}",
        f"federation.min_clients={args.clients}",
        "federation.fraction_evaluate=0",
        "federation.central_eval=false",
    ]
    cfg = load_config(default_config(), overrides)
    arrays = ArrayRecord(adapter_state(prepare(cfg).built.model))
    logging.getLogger("flwr").setLevel(logging.WARNING)
    times: dict[str, list[float]] = {"bare Flower": [], "fedlora": []}
    for _ in range(args.repeats):
        times["bare Flower"].append(bare_flower(cfg, arrays))
        times["fedlora"].append(fedlora_run(cfg))
    table = Table(title=f"{args.clients} clients x {args.rounds} rounds, training off, {len(arrays)} tensors")
    for column in ("app", "wall seconds (each run)", "median"):
        table.add_column(column)
    for name, values in times.items():
        table.add_row(name, ", ".join(f"{v:.1f}" for v in values), f"{statistics.median(values):.1f}")
    console.print(table)
    ratio = statistics.median(times["fedlora"]) / statistics.median(times["bare Flower"])
    console.print(f"fedlora / bare Flower: {ratio:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
