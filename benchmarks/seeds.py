"""Settings compared on the same seeds: each one's mean held-out accuracy (or loss) with its 95%
interval, and its paired difference from the first setting with its interval.

Run: ``python -m benchmarks seeds [CONFIG] --setting NAME [CONFIG] [KEY=VALUE ...]
[--setting ...] [--seeds N] [--set KEY=VALUE ...] [--metric accuracy|loss] [--compare] [--unseeded]
[--out DIR]``

A setting is a name, optionally its own simulation YAML (else CONFIG, else the packaged hospital
simulation), and its overrides; ``--set`` applies to every setting. Seed s = 0..N-1 sets
simulation.seed=s for every setting: the same partition and, in reproducible mode (on unless
``--unseeded``), the same streams of Poisson sampling, DP noise and dropout for each client and round.
Two settings' runs on one seed then differ by the setting alone, so the interval of their paired
difference (Student's t over seeds) leaves out the run-to-run spread they share, which an unpaired
comparison of unseeded runs cannot. Seeded noise is for research only, never for production.

``--compare`` also runs `fedlora.simulations.compare.compare` after every federation (each institution
alone, centralised, and whatever else it reports): every result it returns with the metric, or a list
of them (their mean), gets its own rows. The held-out loss moves with every row's confidence, not only
the rows that flip: steadier where few test rows decide the accuracy.

Runs go to ``--out``/<setting>/seed-<s>; an existing one is resumed (a finished one only re-read), so
an interrupted comparison goes on where it stopped; they run seed by seed across all settings, so a
comparison cut short stays paired. ``seeds.json``, ``seeds.png`` and ``report.md`` are rewritten after
every seed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.table import Table

from fedlora.common.cli_support import console, read_config, report, run_cli
from fedlora.common.config import FedloraConfig
from fedlora.common.errors import ConfigError
from fedlora.simulations.cli import default_config
from fedlora.simulations.compare import compare
from fedlora.simulations.report import SEEDED, federated_result, write_all
from fedlora.simulations.run import simulate
from fedlora.simulations.stats import Estimate, mean_interval, paired_difference

FEDERATED = "federated"


@dataclass(frozen=True)
class Setting:
    name: str
    config: str | None
    overrides: tuple[str, ...]

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.name)


def parse_setting(tokens: list[str]) -> Setting:
    """``NAME [CONFIG] [KEY=VALUE ...]``: a token without '=' after the name is the setting's YAML."""
    name, *rest = tokens
    if "=" in name:
        raise ConfigError(f"--setting {' '.join(tokens)!r}: starts with a name, got {name!r}")
    configs = [t for t in rest if "=" not in t]
    if len(configs) > 1:
        raise ConfigError(f"--setting {name}: one config file at most, got {', '.join(configs)}")
    return Setting(name, configs[0] if configs else None, tuple(t for t in rest if "=" in t))


def scores(summary: dict, metric: str) -> dict[str, float]:
    """Each of compare()'s results by its key: one with the metric, or a list of them (their mean).
    Anything else it returns is not a result and is left out."""
    out = {}
    for key, value in summary.items():
        if isinstance(value, dict) and metric in value:
            out[key] = float(value[metric])
        elif isinstance(value, list) and value and all(isinstance(v, dict) and metric in v for v in value):
            out[f"{key} (mean)"] = statistics.fmean(float(v[metric]) for v in value)
    return out


def run_once(
    setting: Setting, cfg: FedloraConfig, folder: Path, metric: str, with_compare: bool
) -> dict[str, float]:
    """One federation (resumed if the folder holds one), and compare() after it if asked."""
    label = f"{setting.name}, seed {cfg.simulation.seed}"
    start = time.perf_counter()
    with console.status(label) as status:
        simulate(
            cfg,
            folder,
            on_round=lambda e: status.update(
                f"{label}: round {e['round']}/{cfg.federation.rounds}, "
                f"acc {e.get('central', {}).get('accuracy', float('nan')):.3f}"
            ),
        )
    history = write_all(folder, f"{cfg.name}: {setting.name}, seed {cfg.simulation.seed}")
    federated = federated_result(history)
    found = (
        scores(compare(cfg, folder, federated), metric)
        if with_compare
        else {FEDERATED: float(federated.get(metric, math.nan))}
    )
    seconds = time.perf_counter() - start
    shown = ", ".join(f"{k} {v:.4f}" for k, v in found.items())
    console.print(f"{label}: {metric} {shown} ({seconds:.0f} s)")
    return {**found, "seconds": seconds}


def summarise(runs: dict[str, list[dict[str, float]]]) -> list[dict]:
    """Rows of (setting, result): the mean over seeds with its interval, and the paired difference from
    the first setting's same result on the seeds both have run (runs are in seed order)."""
    baseline = next(iter(runs.values()))
    rows = []
    for name, done in runs.items():
        for key in [k for k in done[0] if k != "seconds"] if done else []:
            values = [r[key] for r in done]
            row = {"setting": name, "result": key, "values": values, "mean": mean_interval(values)}
            pairs = [(b[key], v) for b, v in zip(baseline, values, strict=False) if key in b]
            if done is not baseline and pairs:
                row["difference"] = paired_difference(*zip(*pairs, strict=True))
            rows.append(row)
    return rows


def _interval(est: Estimate, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if math.isnan(est.low):
        return f"{est.mean:{sign}.4f}"
    return f"{est.mean:{sign}.4f} ± {est.half_width:.4f} [{est.low:{sign}.4f}, {est.high:{sign}.4f}]"


def cells(row: dict, baseline: str) -> list[str]:
    diff = row.get("difference")
    return [
        row["setting"],
        row["result"],
        str(row["mean"].n),
        _interval(row["mean"]),
        " ".join(f"{v:.4f}" for v in row["values"]),
        "baseline" if row["setting"] == baseline else (_interval(diff, signed=True) if diff else "-"),
    ]


def columns(baseline: str, metric: str) -> tuple[str, ...]:
    return ("setting", "result", "seeds", f"{metric}: mean ± 95% CI", "each seed", f"paired Δ vs {baseline}")


def table(rows: list[dict], baseline: str, metric: str, seeded: bool) -> Table:
    note = f" ({SEEDED})" if seeded else " (unseeded noise: pairs share only the partition)"
    t = Table(title=f"Settings on the same seeds{note}")
    for column in columns(baseline, metric):
        t.add_column(column, justify="left" if column in ("setting", "result") else "right")
    for row in rows:
        t.add_row(*cells(row, baseline))
    return t


def plot(rows: list[dict], baseline: str, metric: str, path: Path) -> None:
    """Left: each setting's mean with its interval; right: its paired difference from the baseline."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    labels = [f"{r['setting']}\n{r['result']}" for r in rows]

    def bars(ax, estimates: list[Estimate | None]) -> None:
        for i, est in enumerate(estimates):
            if est is None:
                continue
            err = None if math.isnan(est.low) else [[est.mean - est.low], [est.high - est.mean]]
            ax.errorbar([i], [est.mean], yerr=err, fmt="o", capsize=4)
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30, ha="right")

    bars(left, [r["mean"] for r in rows])
    left.set(ylabel=f"held-out {metric}", title="Mean over seeds, 95% interval")
    bars(right, [r.get("difference") for r in rows])
    right.axhline(0.0, color="gray", linewidth=0.8)
    right.set(ylabel=f"{metric} difference", title=f"Paired difference vs {baseline}, 95% interval")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    rows: list[dict], baseline: str, metric: str, seeded: bool, seconds: float, out: Path
) -> None:
    head = columns(baseline, metric)
    lines = [
        "# Settings compared on the same seeds",
        "",
        f"**{SEEDED}** (simulation.reproducible)." if seeded else "DP noise unseeded (--unseeded).",
        "",
        f"Held-out {metric}: mean over seeds with Student's t 95% interval. Paired Δ: the mean over "
        f"seeds of the setting's result minus {baseline}'s on the same seed, with its 95% interval.",
        f"Wall time: {seconds:.0f} s.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *["| " + " | ".join(cells(row, baseline)) + " |" for row in rows],
        "",
        "![settings](seeds.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))


def _estimate(est: Estimate | None) -> dict | None:
    return None if est is None else {"mean": est.mean, "low": est.low, "high": est.high, "n": est.n}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", help="simulation YAML (default: the packaged hospital simulation)")
    ap.add_argument(
        "--setting",
        action="append",
        nargs="+",
        default=[],
        metavar="NAME [CONFIG] [KEY=VALUE]",
        help="a setting: its name, optionally its own YAML, and its overrides (repeat; the first is the "
        "baseline)",
    )
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1, the same for every setting")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="applies to every setting"
    )
    ap.add_argument(
        "--metric", choices=("accuracy", "loss"), default="accuracy", help="held-out figure compared"
    )
    ap.add_argument("--compare", action="store_true", help="also each institution alone and centralised")
    ap.add_argument(
        "--unseeded", action="store_true", help="keep DP noise unseeded (pairs share the partition)"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/seeds"), help="comparison folder")
    return ap


def compare_on_seeds(args: argparse.Namespace) -> int:
    chosen = [parse_setting(tokens) for tokens in args.setting] or [Setting("base", None, ())]
    names = [s.name for s in chosen]
    if len(set(names)) < len(names):
        raise ConfigError(f"--setting: two settings named {next(n for n in names if names.count(n) > 1)!r}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds: must be >= 1, got {args.seeds}")
    seeded = not args.unseeded
    if seeded:
        console.print(f"[bold red]{SEEDED}[/]: DP noise and sampling seeded per client and round")
    args.out.mkdir(parents=True, exist_ok=True)
    baseline = names[0]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    start = time.perf_counter()
    for seed in range(args.seeds):
        for s in chosen:
            overrides = [
                *args.set,
                *s.overrides,
                f"simulation.seed={seed}",
                f"simulation.reproducible={seeded}",
            ]
            cfg = read_config(s.config or args.config or default_config(), overrides, "simulation")
            folder = args.out / s.folder / f"seed-{seed}"
            runs[s.name].append(run_once(s, cfg, folder, args.metric, args.compare))
        rows = summarise(runs)
        seconds = time.perf_counter() - start
        saved = [
            {**r, "mean": _estimate(r["mean"]), "difference": _estimate(r.get("difference"))} for r in rows
        ]
        (args.out / "seeds.json").write_text(
            json.dumps(
                {"seeded": seeded, "metric": args.metric, "baseline": baseline, "runs": runs, "rows": saved},
                indent=1,
            )
        )
        plot(rows, baseline, args.metric, args.out / "seeds.png")
        write_report(rows, baseline, args.metric, seeded, seconds, args.out)
    report.print(table(rows, baseline, args.metric, seeded))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: compare_on_seeds(args))
