"""fedlora's simulation overhead over bare Flower, training switched off on both sides.

All runs use the same Ray backend, client count, rounds and adapter tensors (the default config's
LoRA layout and head), Flower's FedAvg on the bare side, no evaluation anywhere:
- bare Flower, echo: a ClientApp that sends back the arrays it receives (no torch in the client);
- bare Flower, LoRA: a minimal LoRA app (Transformers + PEFT, the same base model and layout, one
  model per process) that loads the global adapter and sends its adapter back;
- fedlora: its own apps (model build, fingerprint check, ledger, audit, validation, aggregation,
  checkpoint) with local_steps 0.
The echo baseline prices everything a LoRA client has to do (import torch, load the model); the LoRA
baseline isolates what fedlora adds on top. Run alternately and repeated; prints each wall time and
the median ratios.

    python -m benchmarks overhead [CONFIG] [--set K=V] [--clients 5] [--rounds 3]
        [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from rich.table import Table

from benchmarks import PROG
from benchmarks.bare_flower import LoraSpec, echo_app, initial_adapter, lora_app
from fedlora.common.adapter import adapter_state
from fedlora.common.cli_support import add_config_arguments, read_config, report, run_cli
from fedlora.common.config import FedloraConfig
from fedlora.common.errors import ModelError
from fedlora.common.model import model_dir, target_modules
from fedlora.common.workbench import Workbench, prepare
from fedlora.simulations.cli import default_config
from fedlora.simulations.run import backend_config, quiet_simulation, simulate


def bare_flower(cfg: FedloraConfig, client: ClientApp, arrays: ArrayRecord) -> float:
    """Flower's own FedAvg driving ``client``: no checks, no files."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, _context: Context) -> None:
        n = cfg.simulation.num_clients
        strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=cfg.federation.rounds)

    start = time.perf_counter()
    with quiet_simulation():
        run_simulation(
            server, client, num_supernodes=cfg.simulation.num_clients, backend_config=backend_config(cfg)
        )
    return time.perf_counter() - start


def lora_spec(cfg: FedloraConfig, work: Workbench) -> LoraSpec:
    """fedlora's base model and LoRA layout, for the baseline to rebuild without fedlora."""
    return LoraSpec(
        folder=str(model_dir(cfg.model.source)),
        num_labels=len(work.labels),
        r=cfg.model.lora_r,
        alpha=cfg.model.lora_alpha,
        targets=tuple(target_modules(cfg.model, work.built.model.base_model.model)),
    )


def fedlora_run(cfg: FedloraConfig) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        simulate(cfg, Path(out))
        return time.perf_counter() - start


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} overhead", description=__doc__)
    add_config_arguments(ap, "simulation", "the packaged hospitals.yaml")
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    return ap


def measure(args: argparse.Namespace) -> int:
    overrides = [
        "training.local_steps=0",
        "privacy.enabled=false",
        f"federation.rounds={args.rounds}",
        f"simulation.num_clients={args.clients}",
        f"federation.min_clients={args.clients}",
        "federation.fraction_evaluate=0",
        "federation.central_eval=false",
        "federation.aggregator=fedavg",  # like for like with Flower's FedAvg on the bare side
    ]
    cfg = read_config(args.config or default_config(), [*args.set, *overrides], "simulation")
    work = prepare(cfg)
    arrays = ArrayRecord(adapter_state(work.built.model))
    lora = lora_spec(cfg, work)
    lora_arrays = initial_adapter(lora)
    if sorted(a.shape for a in lora_arrays.values()) != sorted(a.shape for a in arrays.values()):
        raise ModelError("the LoRA baseline's adapter does not match fedlora's tensor for tensor")
    runs = {
        "bare Flower, echo": lambda: bare_flower(cfg, echo_app(), arrays),
        "bare Flower, LoRA": lambda: bare_flower(cfg, lora_app(lora), lora_arrays),
        "fedlora": lambda: fedlora_run(cfg),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(run())
    title = f"{args.clients} clients x {args.rounds} rounds, training off, {len(arrays)} tensors"
    table = Table(title=title)
    for column in ("app", "wall seconds (each run)", "median", "fedlora / this"):
        table.add_column(column)
    ours = statistics.median(times["fedlora"])
    for name, values in times.items():
        median = statistics.median(values)
        table.add_row(name, ", ".join(f"{v:.1f}" for v in values), f"{median:.1f}", f"{ours / median:.2f}x")
    report.print(table)
    report.print("target: fedlora / bare Flower <= 1.3x")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: measure(args))
