"""What federation buys and what privacy costs: the same data and test set, the floor and five ways."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.table import Table

from fedlora.client.app import ClientSetup, client_data, shared_data
from fedlora.client.ledger import PrivacyLedger
from fedlora.client.trainer import LocalTrainer, derive_seed
from fedlora.common.cli_support import console, progress_bar
from fedlora.common.config import FedloraConfig
from fedlora.common.data import TokenizedDataset
from fedlora.common.model import build_model, device_for
from fedlora.common.scoring import evaluate
from fedlora.simulations.partitions import simulation_partitions
from fedlora.simulations.probe import linear_probe


def train_alone(
    cfg: FedloraConfig,
    train: TokenizedDataset,
    test: TokenizedDataset,
    ledger: Path | None,
    label: str,
    party: int,
) -> dict[str, float]:
    """One party trains rounds x local_steps on its own data, then is scored on the shared test set.
    Each party has its own seed, so that in reproducible mode no two draw the same noise."""
    tokenizer, bundle = shared_data(cfg)
    model = build_model(cfg.model, bundle.labels, len(tokenizer)).model
    device = device_for(cfg.training.device)
    book = PrivacyLedger.from_config(cfg.privacy, ledger) if cfg.privacy.enabled and ledger else None
    trainer = LocalTrainer(cfg, model, train, device, book, seed=derive_seed(cfg.training.seed, party))
    epsilon = 0.0
    with progress_bar(label, cfg.federation.rounds * trainer.cfg.training.local_steps) as advance:
        for r in range(1, cfg.federation.rounds + 1):
            epsilon = trainer.train_round(r, on_step=lambda _s, loss: advance(loss)).epsilon or 0.0
    scores = evaluate(trainer.model, cfg.model.task, test, device, cfg.training.eval_batch_size)
    return {**scores, "epsilon": epsilon if book is not None else None, "rows": float(len(train))}


def compare(cfg: FedloraConfig, run_dir: Path, federated: dict[str, float]) -> dict:
    """The federated result beside the floor and the alternatives, on the same data and test set.

    The summary's top-level keys are the settings (``SETTINGS``), each a plain dict of metrics
    (``alone_dp``: one per institution), so a benchmark can read any of them the same way.
    """
    out = run_dir / "compare"
    out.mkdir(parents=True, exist_ok=True)
    trains, evals = simulation_partitions(cfg)
    setups = [
        ClientSetup(cfg, pid, out / f"ledger-{pid}.json", rows=(trains[pid], evals[pid] if evals else None))
        for pid in range(cfg.simulation.num_clients)
    ]
    everything, test = client_data(dataclasses.replace(setups[0], rows=None))
    summary: dict = {}
    if cfg.model.task == "classification":
        tokenizer, bundle = shared_data(cfg)
        summary["linear_probe"] = {
            **linear_probe(cfg.model, bundle.labels, len(tokenizer), everything, test),
            "epsilon": None,
        }
    summary["federated_dp"] = federated
    summary["alone_dp"] = [
        train_alone(
            cfg, client_data(s)[0], test, s.ledger_path, f"client-{s.client_id + 1} alone (DP)", s.client_id
        )
        for s in setups
    ]
    summary["alone_dp_mean"] = {
        key: sum(m[key] for m in summary["alone_dp"]) / len(summary["alone_dp"])
        for key in ("accuracy", "loss", "rows")
        if all(key in m for m in summary["alone_dp"])
    } | {"epsilon": max(m["epsilon"] for m in summary["alone_dp"])}
    if cfg.privacy.enabled:
        summary["centralised_dp"] = train_alone(
            cfg, everything, test, out / "ledger-centralised.json", "centralised (DP)", len(setups)
        )
    central_cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, enabled=False))
    summary["centralised"] = train_alone(
        central_cfg, everything, test, None, "centralised (non-private)", len(setups) + 1
    )
    (out / "compare.json").write_text(json.dumps(summary, indent=1))
    _plot(out / "compare.png", summary)
    console.print(_rich_table(summary))
    return summary


SETTINGS = {
    "linear_probe": "linear probe, frozen base (no DP)",
    "federated_dp": "federated (DP)",
    "alone_dp_mean": "mean institution alone (DP)",
    "centralised_dp": "centralised (DP)",
    "centralised": "centralised (no DP)",
}
"""Summary key -> the setting's name in the table; each institution alone comes after federated."""
COLUMNS = ("setting", "rows", "accuracy", "vs probe", "loss", "epsilon")


def table(summary: dict) -> list[tuple[str, ...]]:
    """The comparison as rows of text (COLUMNS): the one table the terminal and report.md show."""
    settings: list[tuple[str, dict]] = []
    for key, name in SETTINGS.items():
        if key in summary:
            settings.append((name, summary[key]))
        if key == "federated_dp":
            settings += [(f"client-{i + 1} alone (DP)", m) for i, m in enumerate(summary.get("alone_dp", []))]
    floor = summary.get("linear_probe", {}).get("accuracy")
    rows = []
    for name, m in settings:
        accuracy = m.get("accuracy", float("nan"))
        epsilon = m.get("epsilon")
        rows.append(
            (
                name,
                f"{m.get('rows', 0):.0f}",
                f"{accuracy:.4f}",
                f"{100 * (accuracy - floor):+.1f} pts" if floor is not None else "-",
                f"{m.get('loss', float('nan')):.4f}",
                f"{epsilon:.2f}" if epsilon is not None else "none",
            )
        )
    return rows


def markdown(summary: dict) -> str:
    """The table for report.md, with the plot under it."""
    lines = [
        "## Compare: the floor, federated DP, each alone (DP), centralised with and without DP",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(row) + " |" for row in table(summary)),
        "",
        "![compare](compare/compare.png)",
    ]
    return "\n".join(lines)


def _rich_table(summary: dict) -> Table:
    shown = Table(title="The floor, federated DP, each alone (DP), centralised with and without DP")
    for column in COLUMNS:
        shown.add_column(column, justify="left" if column == "setting" else "right")
    for row in table(summary):
        shown.add_row(*row)
    return shown


def _plot(path: Path, summary: dict) -> None:
    rows = [row for row in table(summary) if row[0] != SETTINGS["linear_probe"]]
    names = [row[0].replace(" (", "\n(") for row in rows]
    values = [float(row[2]) for row in rows]
    colors = [
        "tab:gray" if "alone" in name else "tab:blue" if "DP" in name else "tab:green" for name in names
    ]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 1.1), 4))
    ax.bar(names, values, color=colors)
    if "linear_probe" in summary:
        ax.axhline(summary["linear_probe"]["accuracy"], color="black", linestyle="--", label="linear probe")
        ax.legend(loc="lower right")
    ax.set(ylabel="held-out accuracy", ylim=(0, 1), title="What federation buys, what privacy costs")
    ax.tick_params(axis="x", labelsize=7)
    for i, v in enumerate(values):
        ax.text(i, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
