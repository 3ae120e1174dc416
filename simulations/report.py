"""Turns a run's history into files people use: metrics.json/csv, PNG plots and report.md."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedlora.server.history import summarise_round
from fedlora.simulations.run import CONFIG_FILE

SEEDED = "seeded noise, not for production"
CLIENT_FIELDS = ("loss", "epsilon", "num-examples", "steps", "train-seconds", "update_norm", "bytes")


def client_names(history: list[dict]) -> dict[int, str]:
    """Stable names for Flower's random node ids: client-1.. in order of first appearance."""
    names: dict[int, str] = {}
    for entry in history:
        for client in sorted(entry.get("clients", []), key=lambda c: c["node"]):
            names.setdefault(int(client["node"]), f"client-{len(names) + 1}")
    return names


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    names = client_names(history)
    rows = []
    for entry in history:
        central = entry.get("central", {})
        rows.append(
            {"round": entry["round"], "client": "global", **{k: central.get(k) for k in ("loss", "accuracy")}}
        )
        for client in entry.get("clients", []):
            rows.append(
                {
                    "round": entry["round"],
                    "client": names[int(client["node"])],
                    **{k: client.get(k) for k in CLIENT_FIELDS},
                }
            )
        for drop in entry.get("dropped", []):
            rows.append(
                {
                    "round": entry["round"],
                    "client": names.get(int(drop["node"]), str(drop["node"])),
                    "dropped": drop["reason"],
                }
            )
    fields = ["round", "client", "accuracy", *CLIENT_FIELDS, "dropped"]
    with (run_dir / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "metrics.json").write_text(
        json.dumps({"rounds": history, "clients": names}, indent=1, default=float)
    )


def plot_rounds(run_dir: Path, history: list[dict]) -> list[Path]:
    rounds = [e["round"] for e in history if e.get("central")]
    out = []
    if rounds:
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        central = [e["central"] for e in history if e.get("central")]
        if all("accuracy" in c for c in central):
            ax[0].plot(rounds, [c["accuracy"] for c in central], marker="o")
        ax[0].set(title="Global held-out accuracy", xlabel="round", ylabel="accuracy")
        ax[1].plot(rounds, [c["loss"] for c in central], marker="o", color="tab:red")
        ax[1].set(title="Global held-out loss", xlabel="round", ylabel="loss")
        fig.tight_layout()
        fig.savefig(run_dir / "accuracy_loss.png", dpi=120)
        plt.close(fig)
        out.append(run_dir / "accuracy_loss.png")
    names = client_names(history)
    if names:
        fig, ax = plt.subplots(figsize=(6, 4))
        for node, name in names.items():
            points = [
                (e["round"], c["epsilon"]) for e in history for c in e.get("clients", []) if c["node"] == node
            ]
            ax.plot(*zip(*points, strict=True), marker="o", label=name)
        ax.set(title="Privacy spent per client", xlabel="round", ylabel="epsilon")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / "epsilon.png", dpi=120)
        plt.close(fig)
        out.append(run_dir / "epsilon.png")
    return out


def federated_result(history: list[dict]) -> dict[str, float]:
    """The federation's last central scores, with its rows and largest epsilon: what compare() puts
    beside each institution alone and centralised."""
    final = next((e["central"] for e in reversed(history) if e.get("central")), {})
    last = summarise_round(history[-1]) if history else None
    return {**final, "rows": last.examples if last else 0.0, "epsilon": last.epsilon if last else 0.0}


def seeded_noise(run_dir: Path) -> bool:
    """Whether the run's saved config seeded its DP noise and sampling (simulation.reproducible)."""
    path = run_dir / CONFIG_FILE
    saved = yaml.safe_load(path.read_text()) if path.exists() else None
    return bool(((saved or {}).get("simulation") or {}).get("reproducible"))


def write_report(run_dir: Path, history: list[dict], title: str, extra: str = "") -> Path:
    last = next((e for e in reversed(history) if e.get("central")), {})
    first = history[0].get("central", {}) if history else {}
    rounds = [summarise_round(e) for e in history]
    lines = [
        f"# {title}",
        "",
        *(
            [f"**DP noise and sampling seeded (simulation.reproducible): {SEEDED}.**", ""]
            if seeded_noise(run_dir)
            else []
        ),
        f"- rounds: {max((r.round for r in rounds), default=0)}",
        f"- clients: {len(client_names(history))}",
        f"- global held-out accuracy: {first.get('accuracy', float('nan')):.4f} before, "
        f"{last.get('central', {}).get('accuracy', float('nan')):.4f} after",
        f"- global held-out loss: {first.get('loss', float('nan')):.4f} before, "
        f"{last.get('central', {}).get('loss', float('nan')):.4f} after",
        f"- largest epsilon spent by a client: {max((r.epsilon for r in rounds), default=0.0):.3f}",
        f"- replies dropped: {sum(r.dropped for r in rounds)}",
        "",
        "![accuracy and loss](accuracy_loss.png)",
        "",
        "![epsilon](epsilon.png)",
        "",
        extra,
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def audit_section(audits: list) -> str:
    """The report's "Audit" section: per institution, the ledger's claim beside the measured lower
    bounds and what the canaries could prove at most (ceiling)."""
    lines = [
        "## Audit",
        "",
        "Epsilon lower bounds measured with canaries (one-run audit of Steinke, Nasr and Jagielski "
        "2023): white-box gradient canaries scored on the institution's own summed privatized gradients "
        "(without DP: its summed updates), "
        "black-box input canaries on the global adapter; ceiling: the bound had every guess been right.",
        "",
        "| institution | claimed epsilon | kind | canaries | guesses (k+, k-) | correct | lower bound "
        "| ceiling |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for audit in audits:
        result = audit.result
        claim = "none (no DP)" if result.claimed_epsilon is None else f"{result.claimed_epsilon:.3f}"
        for kind, bound in (("white-box", result.white_box), ("black-box", result.black_box)):
            if bound is not None:
                lines.append(
                    f"| client-{audit.client} | {claim} | {kind} | {bound.canaries} | {bound.guesses} "
                    f"({bound.k_plus}, {bound.k_minus}) | {bound.correct} | {bound.epsilon:.3f} | "
                    f"{bound.ceiling:.3f} |"
                )
    confidence = audits[0].result.white_box.confidence if audits else 0.95
    lines += ["", f"Lower bounds at {confidence:.0%} confidence.", ""]
    checked = [a for a in audits if a.result.noise is not None]
    if checked:
        lines += [
            "Noise check: the noise every DP step added (released gradient less the clipped sum, "
            "recomputed) against the calibrated sigma x C, a one-sided chi-square test.",
            "",
            "| institution | measured std | calibrated std | ratio | p-value | passed |",
            "|---|---|---|---|---|---|",
        ]
        for audit in checked:
            n = audit.result.noise
            lines.append(
                f"| client-{audit.client} | {n.measured_std:.4g} | {n.calibrated_std:.4g} | {n.ratio:.4f} "
                f"| {n.p_value:.3g} | {'yes' if n.passed else 'NO'} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_all(run_dir: Path, title: str, extra: str = "") -> list[dict]:
    history = json.loads((run_dir / "history.json").read_text())
    write_metrics(run_dir, history)
    plot_rounds(run_dir, history)
    write_report(run_dir, history, title, extra)
    return history
