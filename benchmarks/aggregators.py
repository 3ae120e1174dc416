"""fedavg vs exact vs ffa (and mixed ranks) on one simulation config, in one comparison run.

Run: ``python -m benchmarks aggregators [CONFIG] [--set K=V] [--out DIR] [--repeats N]
[--only SETTING ...] [--baseline SETTING]``

Every setting is a full simulation of the same config (default: the hospital simulation) into its own
sub-folder of ``--out``, ``--repeats`` times (DP noise and Poisson sampling are unseeded by design, so
one run per setting cannot tell a real difference from luck); an existing run folder is resumed, so an
interrupted comparison goes on where it stopped. Settings: each aggregator with the config's DP and
with DP off, ``exact`` with error feedback, and ``exact`` with mixed client ranks (``--ranks``), the
server keeping the config's rank and, where it differs, the largest client rank, with standard and
with rank-stabilised scales (the config's rank keeping its scale); all under DP.
Written to ``--out``: ``aggregators.json``, ``aggregators.png`` (mean held-out accuracy per round,
one line per setting) and ``report.md`` with the table printed here: final and best accuracy (mean,
spread and every run), each setting's gap to ``--baseline`` in final accuracy and loss with Welch's
95% interval, bytes each client sent per round, server aggregation time per round.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.table import Table

from benchmarks import PROG
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
from fedlora.common.errors import ConfigError
from fedlora.server.history import summarise_round
from fedlora.simulations.cli import default_config
from fedlora.simulations.report import write_all
from fedlora.simulations.run import simulate
from fedlora.simulations.stats import welch_difference


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: tuple[str, ...]


def settings(dp: bool, ranks: list[int], dp_off: bool, global_rank: int, alpha: float) -> list[Setting]:
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
    mode, priv = modes[0]
    out.append(
        Setting(f"exact+ef {mode}", ("federation.aggregator=exact", "federation.error_feedback=true", priv))
    )
    if ranks:
        mixed = (
            "federation.aggregator=exact",
            f"simulation.client_ranks=[{','.join(map(str, ranks))}]",
            priv,
        )
        name = f"exact ranks {'/'.join(map(str, sorted(set(ranks))))}"
        out.append(Setting(f"{name} {mode}", mixed))
        if max(ranks) != global_rank:
            # The server may keep the largest client rank (FlexLoRA): no client's extra rank is cut.
            wide = (*mixed, f"model.lora_r={max(ranks)}")
            out.append(Setting(f"{name} global {max(ranks)} {mode}", wide))
            # Rank-stabilised scales, alpha set so that the config's rank keeps its scale: under Adam a
            # rank-r client moves its product by about scale * sqrt(r), now the same for every rank.
            calibrated = (
                *wide,
                "model.use_rslora=true",
                f"model.lora_alpha={alpha / math.sqrt(global_rank)!r}",
            )
            out.append(Setting(f"{name} global {max(ranks)} rslora {mode}", calibrated))
    return out


def summarise(history: list[dict]) -> dict:
    rounds = [e for e in history if e["round"] > 0]
    accuracy = [e.get("central", {}).get("accuracy") for e in history]
    loss = [e.get("central", {}).get("loss") for e in history]
    sent = [c["bytes"] for e in rounds for c in e.get("clients", [])]
    aggregation = [e["aggregation"]["aggregation_seconds"] for e in rounds if "aggregation" in e]
    return {
        "accuracy": accuracy,
        "final_accuracy": accuracy[-1],
        # Held-out loss moves with every row's confidence, not only the rows that flip: steadier.
        "final_loss": loss[-1],
        "best_accuracy": max(a for a in accuracy if a is not None),
        # Mean over the second half of the rounds: steadier than one round's 169-row score.
        "late_accuracy": statistics.mean(accuracy[len(accuracy) // 2 + 1 :] or accuracy[-1:]),
        "bytes_per_client_round": statistics.mean(sent) if sent else 0.0,
        "aggregation_ms_per_round": 1000 * statistics.mean(aggregation) if aggregation else 0.0,
        "max_epsilon": max((summarise_round(e).epsilon for e in rounds), default=0.0),
    }


def run_once(config: str, extra: list[str], setting: Setting, folder: Path) -> dict:
    cfg: FedloraConfig = read_config(config, [*extra, *setting.overrides], "simulation")
    start = time.perf_counter()
    with console.status(f"{setting.name}: {cfg.federation.rounds} rounds") as status:
        simulate(
            cfg,
            folder,
            on_round=lambda e: status.update(
                f"{setting.name} ({folder.name}): {summarise_round(e).line(cfg.federation.rounds)}"
            ),
        )
    history = write_all(folder, f"{cfg.name}: {setting.name}")
    result = summarise(history)
    console.print(
        f"{setting.name} ({folder.name}): final accuracy {result['final_accuracy']:.4f} "
        f"({time.perf_counter() - start:.0f} s)"
    )
    return result


def combine(name: str, runs: list[dict]) -> dict:
    """One setting over its repeats: mean curve and figures, the spread, and every run's result."""
    finals = [r["final_accuracy"] for r in runs]
    bests = [r["best_accuracy"] for r in runs]
    rounds = min(len(r["accuracy"]) for r in runs)
    return {
        "setting": name,
        "runs": runs,
        "accuracy": [statistics.mean(r["accuracy"][i] for r in runs) for i in range(rounds)],
        "final_accuracy": statistics.mean(finals),
        "final_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
        "best_accuracy": statistics.mean(bests),
        **{
            key: statistics.mean(r[key] for r in runs)
            for key in ("late_accuracy", "final_loss", "bytes_per_client_round", "aggregation_ms_per_round")
        },
        "max_epsilon": max(r["max_epsilon"] for r in runs),
    }


def _finals(r: dict) -> str:
    return " ".join(f"{run['final_accuracy']:.3f}" for run in r["runs"])


def difference(baseline: dict, other: dict, key: str) -> tuple[float, float, float]:
    """``other`` minus ``baseline`` in the mean of a per-run figure, with Welch's 95% interval (runs
    here are unseeded; the seeds benchmark pairs seeded ones)."""
    gap = welch_difference([r[key] for r in baseline["runs"]], [r[key] for r in other["runs"]])
    return gap.mean, gap.low, gap.high


def _versus(baseline: dict, r: dict, key: str) -> str:
    if r is baseline:
        return "baseline"
    gap, low, high = difference(baseline, r, key)
    bounds = "" if math.isnan(low) else f" [{low:+.4f}, {high:+.4f}]"
    return f"{gap:+.4f}{bounds}"


COLUMNS = (
    "setting",
    "round 0",
    "final acc (mean ± sd)",
    "final acc (each run)",
    "Δ final acc (95% CI)",
    "best acc (mean)",
    "late-rounds acc (mean)",
    "final loss (mean)",
    "Δ final loss (95% CI)",
    "KiB/client/round",
    "agg ms/round",
    "max eps",
)


def cells(r: dict, baseline: dict) -> list[str]:
    """One setting's row, in COLUMNS' order; the Δ columns are against ``baseline``."""
    return [
        r["setting"],
        f"{r['accuracy'][0]:.4f}",
        f"{r['final_accuracy']:.4f} ± {r['final_sd']:.4f}",
        _finals(r),
        _versus(baseline, r, "final_accuracy"),
        f"{r['best_accuracy']:.4f}",
        f"{r['late_accuracy']:.4f}",
        f"{r['final_loss']:.4f}",
        _versus(baseline, r, "final_loss"),
        f"{r['bytes_per_client_round'] / 1024:.0f}",
        f"{r['aggregation_ms_per_round']:.1f}",
        f"{r['max_epsilon']:.2f}",
    ]


def table(results: list[dict], baseline: dict) -> Table:
    t = Table(
        title="Aggregators on the same federation (held-out accuracy of the global adapter; "
        f"Δ against {baseline['setting']})"
    )
    for column in COLUMNS:
        t.add_column(column, justify="left" if column == "setting" else "right")
    for r in results:
        t.add_row(*cells(r, baseline))
    return t


def plot(results: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        style = "-" if r["setting"].endswith(" dp") else "--"
        ax.plot(range(len(r["accuracy"])), r["accuracy"], style, marker="o", markersize=3, label=r["setting"])
    title = "Global adapter accuracy per round (mean of runs)"
    ax.set(xlabel="round", ylabel="held-out accuracy", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: list[dict], baseline: dict, out: Path) -> None:
    lines = [
        "# Aggregators: fedavg vs exact vs ffa",
        "",
        f"Δ columns: difference of the means against {baseline['setting']}, with Welch's 95% interval.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cells(r, baseline)) + " |" for r in results]
    lines += ["", "![accuracy per round](aggregators.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} aggregators", description=__doc__)
    add_config_arguments(ap, "simulation", "the packaged hospital simulation")
    add_out_argument(ap, "one sub-folder per setting and repeat, the table, plot and report")
    ap.add_argument("--ranks", type=int, nargs="*", default=[4, 8, 16, 8, 4], help="mixed client ranks")
    ap.add_argument("--no-dp-off", action="store_true", help="skip the settings without DP")
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting (DP noise is unseeded)")
    ap.add_argument("--only", nargs="+", metavar="SETTING", help="run only these settings (by name)")
    ap.add_argument(
        "--baseline",
        metavar="SETTING",
        help="what the Δ columns compare against (default: the first setting)",
    )
    return ap


def compare_aggregators(args: argparse.Namespace) -> int:
    """Repeat by repeat across all settings, so a comparison cut short is still balanced; the files
    are rewritten after every repeat."""
    config = args.config or default_config()
    base = read_config(config, args.set, "simulation")
    chosen = settings(
        base.privacy.enabled, args.ranks, not args.no_dp_off, base.model.lora_r, base.model.lora_alpha
    )
    names = [s.name for s in chosen]
    for option, asked in (
        ("--only", args.only or []),
        ("--baseline", [args.baseline] if args.baseline else []),
    ):
        unknown = [name for name in asked if name not in names]
        if unknown:
            raise ConfigError(f"{option}: no setting {unknown[0]!r}; the settings are {', '.join(names)}")
    if args.only:
        chosen = [s for s in chosen if s.name in args.only]
    if args.baseline and args.baseline not in [s.name for s in chosen]:
        raise ConfigError(f"--baseline: {args.baseline!r} is not among the settings --only chose")
    baseline = args.baseline or chosen[0].name
    args.out = run_folder(args.out, f"{base.name}-aggregators")
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {s.name: [] for s in chosen}
    for k in range(1, args.repeats + 1):
        for s in chosen:
            folder = args.out / s.name.replace(" ", "-").replace("/", "-") / f"run-{k}"
            runs[s.name].append(run_once(config, args.set, s, folder))
        results = [combine(name, done) for name, done in runs.items()]
        base_result = next(r for r in results if r["setting"] == baseline)
        (args.out / "aggregators.json").write_text(json.dumps(results, indent=1))
        plot(results, args.out / "aggregators.png")
        write_report(results, base_result, args.out)
    report.print(table(results, base_result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: compare_aggregators(args))
