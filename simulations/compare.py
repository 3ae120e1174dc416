"""What federation buys and what privacy costs: the same data and budget three ways."""

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
from fedlora.client.trainer import LocalTrainer
from fedlora.common.cli_support import console, progress_bar
from fedlora.common.config import FedloraConfig
from fedlora.common.data import TokenizedDataset
from fedlora.common.model import build_model, device_for
from fedlora.common.scoring import evaluate


def train_alone(
    cfg: FedloraConfig, train: TokenizedDataset, test: TokenizedDataset, ledger: Path | None, label: str
) -> dict[str, float]:
    """One party trains rounds x local_steps on its own data, then is scored on the shared test set."""
    tokenizer, bundle = shared_data(cfg)
    model = build_model(cfg.model, bundle.labels, len(tokenizer)).model
    device = device_for(cfg.training.device)
    p = cfg.privacy
    book = PrivacyLedger(ledger, p.epsilon, p.delta, p.accountant) if p.enabled and ledger else None
    trainer = LocalTrainer(cfg, model, train, device, book)
    epsilon = 0.0
    with progress_bar(label, cfg.federation.rounds * trainer.cfg.training.local_steps) as advance:
        for r in range(1, cfg.federation.rounds + 1):
            epsilon = trainer.train_round(r, on_step=lambda _s, loss: advance(loss)).epsilon or 0.0
    scores = evaluate(trainer.model, cfg.model.task, test, device, cfg.training.eval_batch_size)
    return {**scores, "epsilon": epsilon, "rows": float(len(train))}


def compare(cfg: FedloraConfig, run_dir: Path, federated: dict[str, float]) -> dict:
    """Each institution alone with DP, and centralised non-private, against the federated result."""
    out = run_dir / "compare"
    out.mkdir(parents=True, exist_ok=True)
    setups = [
        ClientSetup(cfg, pid, out / f"ledger-{pid}.json", pid) for pid in range(cfg.simulation.num_clients)
    ]
    everything, test = client_data(dataclasses.replace(setups[0], partition=None))
    alone = [
        train_alone(cfg, client_data(s)[0], test, s.ledger_path, f"client-{s.client_id + 1} alone (DP)")
        for s in setups
    ]
    central_cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, enabled=False))
    central = train_alone(central_cfg, everything, test, None, "centralised (non-private)")
    summary = {"federated_dp": federated, "alone_dp": alone, "centralised": central}
    (out / "compare.json").write_text(json.dumps(summary, indent=1))
    _plot(out / "compare.png", summary)
    _table(summary)
    return summary


def _table(summary: dict) -> None:
    table = Table(title="Federated DP vs each institution alone (DP) vs centralised (non-private)")
    for column in ("setting", "rows", "accuracy", "loss", "epsilon"):
        table.add_column(column)

    def row(name: str, m: dict) -> None:
        table.add_row(
            name,
            f"{m.get('rows', 0):.0f}",
            f"{m.get('accuracy', float('nan')):.4f}",
            f"{m.get('loss', float('nan')):.4f}",
            f"{m.get('epsilon', 0.0):.2f}",
        )

    row("federated (DP)", summary["federated_dp"])
    for i, m in enumerate(summary["alone_dp"]):
        row(f"client-{i + 1} alone (DP)", m)
    row("centralised (no DP)", summary["centralised"])
    console.print(table)


def _plot(path: Path, summary: dict) -> None:
    names = [
        "federated\n(DP)",
        *[f"client-{i + 1}\nalone (DP)" for i in range(len(summary["alone_dp"]))],
        "centralised\n(no DP)",
    ]
    values = [
        summary["federated_dp"].get("accuracy", 0.0),
        *[m.get("accuracy", 0.0) for m in summary["alone_dp"]],
        summary["centralised"].get("accuracy", 0.0),
    ]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 1.1), 4))
    ax.bar(names, values, color=["tab:blue", *["tab:gray"] * len(summary["alone_dp"]), "tab:green"])
    ax.set(ylabel="held-out accuracy", ylim=(0, 1), title="What federation buys, what privacy costs")
    for i, v in enumerate(values):
        ax.text(i, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
