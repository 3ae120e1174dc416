"""``fedlora-simulate``: many virtual institutions fine-tune one shared adapter on this machine."""

from __future__ import annotations

import argparse
import sys
import time
from importlib.resources import files
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedlora.common.cli_support import console, read_config, run_cli
from fedlora.simulations.compare import compare, markdown
from fedlora.simulations.report import write_all, write_report
from fedlora.simulations.run import simulate

DEFAULT_CONFIG = "hospitals.yaml"


def default_config() -> str:
    return str(files("fedlora.configs.simulation") / DEFAULT_CONFIG)


def _progress_fields(entry: dict) -> dict[str, str]:
    """Loss and accuracy of the central evaluation: clients send no loss unless they opt in."""
    clients = entry.get("clients", [])
    central = entry.get("central", {})
    loss, acc = central.get("loss"), central.get("accuracy")
    return {
        "clients": f"{len(clients)} ok, {len(entry.get('dropped', []))} dropped",
        "loss": f"{loss:.4f}" if loss is not None else "-",
        "acc": f"{acc:.4f}" if acc is not None else "-",
        "eps": f"{max((c['epsilon'] for c in clients), default=0.0):.2f}",
    }


def run(args: argparse.Namespace) -> int:
    path = args.config or default_config()
    cfg = read_config(path, args.set, "simulation")
    out = Path(args.out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    console.print(
        f"[bold]{cfg.name}[/]: {cfg.simulation.num_clients} clients, {cfg.federation.rounds} rounds, "
        f"{cfg.model.source} ({cfg.model.task}), aggregator {cfg.federation.aggregator}, "
        f"DP {'epsilon ' + format(cfg.privacy.epsilon, 'g') if cfg.privacy.enabled else 'off'} -> {out}"
    )
    columns = (
        TextColumn("round"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[clients]}"),
        TextColumn("held-out loss {task.fields[loss]}"),
        TextColumn("acc {task.fields[acc]}"),
        TextColumn("eps {task.fields[eps]}"),
        TimeElapsedColumn(),
    )
    start = time.perf_counter()
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("rounds", total=cfg.federation.rounds, clients="-", loss="-", acc="-", eps="-")
        simulate(cfg, out, on_round=lambda e: bar.update(task, completed=e["round"], **_progress_fields(e)))
    seconds = time.perf_counter() - start
    title = f"{cfg.name}: federated simulation"
    history = write_all(out, title, extra=f"Wall time: {seconds:.1f} s.\n")
    final = next((e["central"] for e in reversed(history) if e.get("central")), {})
    if args.compare:
        federated = {**final, "rows": float(sum(c["num-examples"] for c in history[-1].get("clients", [])))}
        federated["epsilon"] = max((c["epsilon"] for c in history[-1].get("clients", [])), default=0.0)
        summary = compare(cfg, out, federated)
        write_report(out, history, title, f"Wall time: {seconds:.1f} s.\n\n" + markdown(summary))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k != "examples")
    console.print(f"done in {seconds:.0f} s: {shown}; report at {out / 'report.md'}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedlora-simulate", description=__doc__)
    ap.add_argument("config", nargs="?", help=f"simulation YAML (default: the packaged {DEFAULT_CONFIG})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    ap.add_argument("--out", help="run folder (default: runs/<name>-<time>); an existing one is resumed")
    ap.add_argument(
        "--compare",
        action="store_true",
        help="also score a linear probe on the frozen base (the floor), and train each institution alone "
        "(DP) and centrally (DP and not) on the same data",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
