"""fedavg vs exact vs ffa (and mixed ranks) on one simulation config, in one comparison run.

Run: ``python -m fedlora.simulations.benchmarks.aggregators [CONFIG] [--out DIR] [--set k=v ...]``

Every setting is a full simulation of the same config (default: the hospital simulation) into its own
sub-folder of ``--out``; an existing sub-folder is resumed, so an interrupted comparison goes on where
it stopped. Settings: each aggregator with the config's DP and with DP off, and ``exact`` with mixed
client ranks (``--ranks``) under DP. Written to ``--out``: ``aggregators.json``, ``aggregators.png``
(held-out accuracy per round, one line per setting) and ``report.md`` with the table printed here:
final and best accuracy, bytes each client sent per round, server aggregation time per round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.table import Table

from fedlora.common.cli_support import console, read_config, report, run_cli
from fedlora.common.config import FedloraConfig
from fedlora.simulations.cli import default_config
from fedlora.simulations.report import write_all
from fedlora.simulations.run import simulate


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: tuple[str, ...]


def settings(dp: bool, ranks: list[int], dp_off: bool) -> list[Setting]:
    aggregators = {
        "fedavg": ("federation.aggregator=fedavg",),
        "exact": ("federation.aggregator=exact",),
        "ffa": ("federation.aggregator=ffa", "model.variant=ffa"),
    }
    modes = [("dp", "privacy.enabled=true")] if dp else []
    if dp_off or not dp:
        modes.append(("no-dp", "privacy.enabled=false"))
    out = [
        Setting(f"{agg} {mode}", (*sets, priv)) for mode, priv in modes for agg, sets in aggregators.items()
    ]
    if ranks:
        mode, priv = modes[0]
        rank_list = "[" + ",".join(str(r) for r in ranks) + "]"
        out.append(
            Setting(
                f"exact ranks {'/'.join(map(str, sorted(set(ranks))))} {mode}",
                ("federation.aggregator=exact", f"simulation.client_ranks={rank_list}", priv),
            )
        )
    return out


def summarise(history: list[dict]) -> dict:
    rounds = [e for e in history if e["round"] > 0]
    accuracy = [e.get("central", {}).get("accuracy") for e in history]
    sent = [c["bytes"] for e in rounds for c in e.get("clients", [])]
    aggregation = [e["aggregation"]["aggregation_seconds"] for e in rounds if "aggregation" in e]
    return {
        "accuracy": accuracy,
        "final_accuracy": accuracy[-1],
        "best_accuracy": max(a for a in accuracy if a is not None),
        "bytes_per_client_round": statistics.mean(sent) if sent else 0.0,
        "aggregation_ms_per_round": 1000 * statistics.mean(aggregation) if aggregation else 0.0,
        "max_epsilon": max(
            (c.get("epsilon", 0.0) for e in rounds for c in e.get("clients", [])), default=0.0
        ),
    }


def run_setting(config: str, extra: list[str], setting: Setting, out: Path) -> dict:
    cfg: FedloraConfig = read_config(config, [*extra, *setting.overrides])
    folder = out / setting.name.replace(" ", "-").replace("/", "-")
    start = time.perf_counter()
    with console.status(f"{setting.name}: {cfg.federation.rounds} rounds") as status:
        simulate(
            cfg,
            folder,
            on_round=lambda e: status.update(
                f"{setting.name}: round {e['round']}/{cfg.federation.rounds}, "
                f"acc {e.get('central', {}).get('accuracy', float('nan')):.3f}"
            ),
        )
    history = write_all(folder, f"{cfg.name}: {setting.name}")
    result = {"setting": setting.name, "folder": folder.name, **summarise(history)}
    console.print(
        f"{setting.name}: final accuracy {result['final_accuracy']:.4f} ({time.perf_counter() - start:.0f} s)"
    )
    return result


def table(results: list[dict]) -> Table:
    t = Table(title="Aggregators on the same federation (held-out accuracy of the global adapter)")
    for column in (
        "setting",
        "round 0",
        "final acc",
        "best acc",
        "KiB/client/round",
        "agg ms/round",
        "max eps",
    ):
        t.add_column(column, justify="left" if column == "setting" else "right")
    for r in results:
        t.add_row(
            r["setting"],
            f"{r['accuracy'][0]:.4f}",
            f"{r['final_accuracy']:.4f}",
            f"{r['best_accuracy']:.4f}",
            f"{r['bytes_per_client_round'] / 1024:.0f}",
            f"{r['aggregation_ms_per_round']:.1f}",
            f"{r['max_epsilon']:.2f}",
        )
    return t


def plot(results: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        style = "-" if r["setting"].endswith(" dp") else "--"
        ax.plot(range(len(r["accuracy"])), r["accuracy"], style, marker="o", markersize=3, label=r["setting"])
    ax.set(xlabel="round", ylabel="held-out accuracy", title="Global adapter accuracy per round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: list[dict], out: Path) -> None:
    lines = [
        "# Aggregators: fedavg vs exact vs ffa",
        "",
        "| setting | round 0 | final acc | best acc | KiB/client/round | agg ms/round | max eps |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['setting']} | {r['accuracy'][0]:.4f} | {r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} "
        f"| {r['bytes_per_client_round'] / 1024:.0f} | {r['aggregation_ms_per_round']:.1f} "
        f"| {r['max_epsilon']:.2f} |"
        for r in results
    ]
    lines += ["", "![accuracy per round](aggregators.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", help="simulation YAML (default: the packaged hospital simulation)")
    ap.add_argument("--out", type=Path, default=Path("runs/aggregators"), help="comparison folder")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="applies to every setting"
    )
    ap.add_argument("--ranks", type=int, nargs="*", default=[4, 8, 16, 8, 4], help="mixed client ranks")
    ap.add_argument("--no-dp-off", action="store_true", help="skip the settings without DP")
    return ap


def compare_aggregators(args: argparse.Namespace) -> int:
    config = args.config or default_config()
    dp = read_config(config, args.set).privacy.enabled
    args.out.mkdir(parents=True, exist_ok=True)
    results = [
        run_setting(config, args.set, s, args.out) for s in settings(dp, args.ranks, not args.no_dp_off)
    ]
    (args.out / "aggregators.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "aggregators.png")
    write_report(results, args.out)
    report.print(table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: compare_aggregators(args))


if __name__ == "__main__":
    sys.exit(main())
