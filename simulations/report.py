"""Turns a run's history into files people use: metrics.json/csv, PNG plots and report.md.

The figures "after" training are the exported round's (common.held_out: the round best on
validation), scored on the final test set; report.md flags every round whose test predictions
collapse onto one class.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedlora.common.adapter import METADATA_FILE
from fedlora.common.config import read_yaml
from fedlora.common.held_out import exported_round
from fedlora.common.model_card import ADAPTER_DIR, rounds_statement
from fedlora.common.noise_check import NoiseCheck
from fedlora.common.scoring import MACRO_F1, TOP_CLASS, TOP_SHARE
from fedlora.server.history import client_names, summarise_round
from fedlora.simulations.head_round_audit import HeadRoundAudit, SecureHeadAudit
from fedlora.simulations.run import CONFIG_FILE
from fedlora.simulations.secure_sum_audit import SumAudit

SEEDED = "seeded noise, not for production"
CLIENT_FIELDS = ("loss", "epsilon", "num-examples", "steps", "train-seconds", "update_norm", "bytes")
COLLAPSE_SHARE = 0.9
"""A round whose test predictions give one class more than this share of the rows has collapsed."""


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    names = client_names(history)
    rows = []
    for entry in history:
        central = entry.get("central", {})
        rows.append(
            {
                "round": entry["round"],
                "client": "global",
                **{k: central.get(k) for k in ("loss", "accuracy", MACRO_F1)},
            }
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
    fields = ["round", "client", "accuracy", MACRO_F1, *CLIENT_FIELDS, "dropped"]
    with (run_dir / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "metrics.json").write_text(
        json.dumps(
            {"rounds": history, "clients": names, "exported_round": exported_round(history)},
            indent=1,
            default=float,
        )
    )


def plot_rounds(run_dir: Path, history: list[dict]) -> list[Path]:
    rounds = [e["round"] for e in history if e.get("central")]
    out = []
    if rounds:
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        central = [e["central"] for e in history if e.get("central")]
        for key in ("accuracy", MACRO_F1):
            if all(key in c for c in central):
                ax[0].plot(rounds, [c[key] for c in central], marker="o", label=key)
        ax[0].set(title="Global held-out test scores", xlabel="round", ylabel="score")
        if ax[0].lines:
            ax[0].legend(fontsize=8)
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


def exported_entry(history: list[dict]) -> dict:
    """The history entry of the exported round (the best on validation, else the last scored)."""
    chosen = exported_round(history)["round"]
    entry = next((e for e in history if e["round"] == chosen and e.get("central")), None)
    return entry or next((e for e in reversed(history) if e.get("central")), {})


def federated_result(history: list[dict]) -> dict[str, float]:
    """The exported round's test scores, with the most rows any round's replies stood for and the
    largest epsilon any reply reported (not the last round's: after statistics only, round 0's):
    what compare() puts beside each institution alone and centralised."""
    final = exported_entry(history).get("central", {})
    rounds = [summarise_round(e) for e in history]
    rows = max((r.examples for r in rounds), default=0.0)
    return {**final, "rows": rows, "epsilon": max((r.epsilon for r in rounds), default=0.0)}


def saved_section(run_dir: Path, section: str) -> dict:
    """A section of the run's saved config; empty without one."""
    path = run_dir / CONFIG_FILE
    saved = read_yaml(path) if path.exists() else None
    return (saved or {}).get(section) or {}


def seeded_noise(run_dir: Path) -> bool:
    """Whether the run's saved config seeded its DP noise and sampling (simulation.reproducible)."""
    return bool(saved_section(run_dir, "simulation").get("reproducible"))


def planned_rounds(run_dir: Path) -> int:
    """The rounds the run's saved config planned (federation.rounds; 0 without a saved config)."""
    return int(saved_section(run_dir, "federation").get("rounds") or 0)


def run_labels(run_dir: Path) -> list[str]:
    """The label names the exported adapter records (empty before export or for a causal LM)."""
    path = run_dir / ADAPTER_DIR / METADATA_FILE
    return list(json.loads(path.read_text()).get("labels") or []) if path.exists() else []


def collapse_lines(history: list[dict], labels: list[str]) -> list[str]:
    """One line per round whose test predictions put over COLLAPSE_SHARE of the rows in one class."""
    lines = []
    for entry in history:
        central = entry.get("central") or {}
        share = central.get(TOP_SHARE)
        if share is not None and share > COLLAPSE_SHARE:
            index = int(central[TOP_CLASS])
            name = labels[index] if index < len(labels) else f"class {index}"
            lines.append(f"- round {entry['round']}: collapse: predicts {name} for {share:.0%} of rows")
    return lines


def write_report(run_dir: Path, history: list[dict], title: str, extra: str = "") -> Path:
    last = exported_entry(history)
    first = history[0].get("central", {}) if history else {}
    rounds = [summarise_round(e) for e in history]
    chosen = exported_round(history)
    collapses = collapse_lines(history, run_labels(run_dir))
    lines = [
        f"# {title}",
        "",
        *(
            [f"**DP noise and sampling seeded (simulation.reproducible): {SEEDED}.**", ""]
            if seeded_noise(run_dir)
            else []
        ),
        f"- rounds: {rounds_statement(history, planned_rounds(run_dir))}",
        f"- clients: {len(client_names(history))}",
        f"- exported adapter: round {chosen['round']}, {chosen['chosen_by']}; the test set below never "
        "chose it",
        *(
            f"- global held-out test {key}: {first.get(key, float('nan')):.4f} before, "
            f"{last.get('central', {}).get(key, float('nan')):.4f} after (round {chosen['round']})"
            for key in ("accuracy", MACRO_F1, "loss")
            if key in first or key in last.get("central", {})
        ),
        f"- largest epsilon spent by a client: {max((r.epsilon for r in rounds), default=0.0):.3f}",
        f"- replies dropped: {sum(r.dropped for r in rounds)}",
        "",
        *(["## Collapse", "", *collapses, ""] if collapses else []),
        "![accuracy and loss](accuracy_loss.png)",
        "",
        "![epsilon](epsilon.png)",
        "",
        extra,
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def audit_section(
    audits: list,
    summed: SumAudit | None = None,
    heads: list[HeadRoundAudit] | None = None,
    secure_heads: SecureHeadAudit | None = None,
) -> str:
    """The report's "Audit" section: per institution, the ledger's claim beside the measured lower
    bounds and what the canaries could prove at most (ceiling); under secure aggregation, the check
    of round 0's summed noise (``summed``); the check of the head rounds' noise (``heads``; under
    secure aggregation of their unmasked sums, ``secure_heads``)."""
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
    if summed is not None:
        lines += [*secure_sum_lines(summed), ""]
    if heads:
        lines += [*head_round_lines(heads), ""]
    if secure_heads is not None:
        lines += [*secure_head_lines(secure_heads), ""]
    return "\n".join(lines)


def head_round_lines(audits: list[HeadRoundAudit]) -> list[str]:
    """What the audit of the head rounds checked, and what it cannot test."""
    lines = [
        "Head rounds: each institution sent one noisy, clipped gradient sum of the head a round. Its "
        "noise (the release less the exact clipped sum, handed over inside the simulation only) is "
        "checked against the ledger's sigma x C, a one-sided chi-square test. No canary membership test "
        "covers them: white-box canaries live in the LoRA gradients, which head rounds do not train, and "
        "an institution answering only head rounds has no canary bound above.",
        "",
        "| institution | values | measured std | calibrated std | ratio (interval) | p-value | passed |",
        "|---|---|---|---|---|---|---|",
    ]
    for audit in audits:
        n = audit.check
        lines.append(
            f"| client-{audit.client} | {n.samples:,} | {n.measured_std:.4g} | {n.calibrated_std:.4g} | "
            f"{n.ratio:.4f} ({n.ratio_interval[0]:.3f}, {n.ratio_interval[1]:.3f}) | {n.p_value:.3g} | "
            f"{'yes' if n.passed else 'NO'} |"
        )
    weakest = max(audits, key=lambda a: a.check.detectable_ratio).check
    return [
        *lines,
        "",
        f"Power: {weakest.samples:,} values (the fewest of any institution) catch a std ratio below "
        f"{weakest.detectable_ratio:.3f} (probability 0.999); a smaller shortfall passes.",
    ]


def noise_table(n: NoiseCheck) -> list[str]:
    """One noise check as a Markdown table (the securely summed noise of round 0 or the head rounds)."""
    return [
        "| values | measured std | claimed std | ratio (interval) | p-value | passed |",
        "|---|---|---|---|---|---|",
        f"| {n.samples:,} | {n.measured_std:.4g} | {n.calibrated_std:.4g} | {n.ratio:.4f} "
        f"({n.ratio_interval[0]:.3f}, {n.ratio_interval[1]:.3f}) | {n.p_value:.3g} | "
        f"{'yes' if n.passed else 'NO'} |",
    ]


def secure_head_lines(audit: SecureHeadAudit) -> list[str]:
    """What the audit of the secure head rounds' summed noise checked, and what it could have caught."""
    shown = ", ".join(map(str, audit.rounds)) or "none"
    lines = [
        f"Secure aggregation, head rounds ({shown}): each institution added a share of the noise, so the "
        "check is on each round's unmasked sum less the institutions' exact clipped sums (known to the "
        "simulation only), against the largest sigma x C their ledgers claim, a one-sided chi-square test.",
        "",
    ]
    power = (
        f"One of the m = {audit.honest} guaranteed institutions adding no share leaves "
        f"{audit.missing_share_ratio:.3f} of the claimed std, caught from "
        f"{audit.samples_to_catch_missing_share:,} noised values"
    )
    skipped = [f"Not checked: {why}." for why in audit.skipped]
    if audit.check is None:
        return [*lines, *skipped, f"{power}."]
    n = audit.check
    return [
        *lines,
        *noise_table(n),
        "",
        *skipped,
        f"{power}: this run had {n.samples:,}.",
    ]


def secure_sum_lines(audit: SumAudit) -> list[str]:
    """What the audit of round 0's securely summed noise checked, and what it could have caught."""
    claim = "none recorded" if audit.claimed_sigma is None else f"{audit.claimed_sigma:.4g}"
    power = (
        f"One of the m = {audit.honest} guaranteed institutions adding no share leaves "
        f"{audit.missing_share_ratio:.3f} of the claimed std; the check catches that (probability 0.999) "
        f"from {audit.samples_to_catch_missing_share:,} noised values on"
    )
    lines = [
        "Secure aggregation, round 0: each institution added a share of the noise, so the check is on "
        f"the unmasked sum of {audit.survivors} of {audit.institutions} institutions less their exact "
        "statistics (known to the simulation only), against the largest claimed sigma x C "
        f"(sigma {claim}), a one-sided chi-square test.",
        "",
    ]
    if audit.check is None:
        return [*lines, f"Not checked: {audit.skipped}. {power}."]
    n = audit.check
    verdict = "catches" if n.samples >= audit.samples_to_catch_missing_share else "cannot catch"
    return [
        *lines,
        *noise_table(n),
        "",
        f"{power}: this run's {n.samples:,} {verdict} it (they detect a ratio below "
        f"{n.detectable_ratio:.3f}).",
    ]


def tracked_files(run_dir: Path) -> list[Path]:
    """What experiment tracking keeps of a run folder: the exported adapter with its model card,
    report.md and the plots (not the canaries' secret seeds, ledgers or audit logs)."""
    return [run_dir / ADAPTER_DIR, run_dir / "report.md", *sorted(run_dir.glob("*.png"))]


def audit_metrics(audits: list) -> dict[str, float]:
    """The audit section's figures for experiment tracking: per institution, the claimed epsilon
    and each kind's measured lower bound and ceiling (``audit/client-1/white-box``)."""
    found: dict[str, float] = {}
    for audit in audits:
        result, name = audit.result, f"audit/client-{audit.client}"
        if result.claimed_epsilon is not None:
            found[f"{name}/claimed"] = result.claimed_epsilon
        for kind, bound in (("white-box", result.white_box), ("black-box", result.black_box)):
            if bound is not None:
                found[f"{name}/{kind}"] = bound.epsilon
                found[f"{name}/{kind}-ceiling"] = bound.ceiling
    return found


def write_all(run_dir: Path, title: str, extra: str = "") -> list[dict]:
    history = json.loads((run_dir / "history.json").read_text())
    write_metrics(run_dir, history)
    plot_rounds(run_dir, history)
    write_report(run_dir, history, title, extra)
    return history
