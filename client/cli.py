"""``fedlora-client``: the institution's command."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from rich.table import Table
from torch import nn

from fedlora.client.canaries import BLACK_BOX_CANARIES, WHITE_BOX_CANARIES
from fedlora.client.daemon import (
    ACTIVATION_PATIENCE,
    RUNTIME_PORT,
    SUPERNODE_PROGRAMS,
    SuperNodeOptions,
    own_superexec,
    run_supernode,
    supernode_command,
    worker_running,
)
from fedlora.client.export_merged import export_merged
from fedlora.client.ledger import PrivacyLedger
from fedlora.client.predict import (
    Decoding,
    inputs,
    load_trained,
    predict_frame,
    prediction_lines,
    recorded,
    write_predictions,
)
from fedlora.client.privacy_audit import AuditResult, require_no_leak, run_local_audit
from fedlora.client.privacy_unit import unit_counts
from fedlora.client.trainer import LocalTrainer, PrivacyPlan, privacy_plan, private_engine
from fedlora.common.adapter import adapter_state, export_adapter, non_finite
from fedlora.common.cli_support import (
    add_config_arguments,
    add_out_argument,
    console,
    create_folder,
    finish_help,
    progress_bar,
    read_config,
    report,
    run_cli,
    run_folder,
)
from fedlora.common.config import FedloraConfig, to_dict
from fedlora.common.data import TokenizedDataset, read_table
from fedlora.common.durable import write_durably
from fedlora.common.errors import BudgetExceeded, ConfigError, FedloraError, TrainingDiverged
from fedlora.common.launch import STOP_GRACE_SECONDS, flower_program
from fedlora.common.model import device_for
from fedlora.common.model_card import write_model_card
from fedlora.common.noise_check import NoiseCheck
from fedlora.common.scoring import evaluate
from fedlora.common.secure_aggregation.identity import create_signing_key, load_identity, public_text
from fedlora.common.tracking import add_track_argument, tracked
from fedlora.common.workbench import prepare

ADAPTER, METRICS = "adapter", "metrics.json"
EXAMPLES = {
    "check": "fedlora-client check hospital-a.yaml",
    "train-local": "fedlora-client train-local hospital-a.yaml --out local-run --track",
    "audit": "fedlora-client audit hospital-a.yaml --out audit-run",
    "keys": "fedlora-client keys hospital-a.yaml",
    "start": "fedlora-client start hospital-a.yaml",
    "predict": "fedlora-client predict local-run --input new-rows.csv --out predicted.csv",
    "export": "fedlora-client export local-run --merged merged-model",
}


MAX_REPORTED_POINTS = 10


def reported_rounds(planned: int) -> list[int]:
    """At most MAX_REPORTED_POINTS evenly spaced rounds and the last: each is one composition."""
    step = max(1, planned // MAX_REPORTED_POINTS)
    return sorted({*range(step, planned + 1, step), planned})


def plan(
    cfg: FedloraConfig, model: nn.Module, train: TokenizedDataset
) -> tuple[PrivacyPlan, dict | None]:
    """The plan the trainer runs (client.trainer.privacy_plan, on this institution's data and
    ledger), and with DP what the budget buys from the ledger's state: spend (also without the
    aggregation assumption once a distributed-noise round is recorded), epsilon (per person with
    data.privacy_unit) after some planned rounds (the round-0 statistics still to come included;
    round 0 alone when the planner plans statistics only; head rounds are one step each at sample
    rate 1) and the rounds it affords."""
    ledger = PrivacyLedger.from_config(cfg.privacy) if cfg.privacy.enabled else None
    planned = privacy_plan(cfg, model, train, ledger)
    if ledger is None:
        return planned, None
    recipe, cfg = planned.recipe, planned.cfg
    sample_rate, steps, noise = planned.sample_rate, cfg.training.local_steps, planned.noise_multiplier
    if recipe.head_rounds.value:
        steps = 1  # one noisy step of the head a round (client.head_rounds), no LoRA step
    # As the client does: the statistics are released at round 0 of a fresh ledger, before the rounds.
    first = recipe.statistics_history() if not ledger.entries else ()
    rounds_train = recipe.fine_tune.value or recipe.head_rounds.value
    if rounds_train:
        rounds = reported_rounds(cfg.planned_rounds)
        after = {k: ledger.projected(noise, sample_rate, steps * k, first) for k in rounds}
    else:
        after = {0: ledger.projected(*first[0])} if first else {}
    budget = {
        "sample_rate": sample_rate,
        "noise_multiplier": noise,
        "steps_per_round": steps,
        "spent": ledger.spent,
        "spent_alone": ledger.spent_alone,
        "epsilon_after_round": after,
        "rounds_affordable": ledger.rounds_affordable(
            sample_rate, steps, limit=max(10_000, 2 * cfg.planned_rounds), also=first
        )
        if rounds_train
        else 0,
    }
    return planned, budget


def _shown(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def cmd_check(args: argparse.Namespace) -> int:
    cfg = read_config(args.config, args.set, "institution")
    bench = prepare(cfg)
    data = bench.data
    table = Table(title=f"{cfg.name}: {args.config or 'defaults'}", show_header=False)
    table.add_row("task", f"{cfg.model.task} on {cfg.model.source} (LoRA r={cfg.model.lora_r})")
    table.add_row("training rows", str(len(data.train)))
    table.add_row("eval rows", str(len(data.eval)) if data.eval is not None else "none")
    if data.labels:
        counts = {label: int((data.train_label_ids == i).sum()) for i, label in enumerate(data.labels)}
        table.add_row("labels", ", ".join(f"{k} ({v})" for k, v in counts.items()))
    table.add_row("fingerprint", bench.built.fingerprint)
    units = (
        unit_counts(data.train.units, cfg.data.max_rows_per_unit) if data.train.units is not None else None
    )
    if units is None:
        table.add_row(
            "privacy unit",
            "row: each epsilon is per row; a person with k rows is protected "
            "only at about k times it (group privacy)",
        )
    else:
        table.add_row(
            "privacy unit", f"person (column '{cfg.data.privacy_unit}'): each epsilon is per person"
        )
        table.add_row("persons", str(units.persons))
        table.add_row(
            "rows per person",
            f"min {units.min_rows}, median {units.median_rows:g}, max {units.max_rows} ({units.rows} rows)",
        )
        table.add_row(
            "rows per person cap",
            f"{units.cap} (data.max_rows_per_unit): a sampled person's step uses at most {units.cap} rows, "
            "their mean gradient clipped as one",
        )
    planned, p = plan(cfg, bench.built.model, data.train)
    recipe = planned.recipe
    table.add_row("recipe", cfg.training.recipe)
    for name, choice in recipe.items():
        table.add_row(name.replace("_", " "), f"{_shown(choice.value)}: {choice.reason}")
    if p is not None:
        table.add_row("spent so far", f"epsilon {p['spent']:.3f} of {cfg.privacy.epsilon:g}")
        if p["spent_alone"] is not None:
            table.add_row(
                "spent without aggregation",
                f"epsilon {p['spent_alone']:.3f}: distributed-noise rounds at this institution's share "
                "alone, should the coordinator see its reply outside a secure sum",
            )
        table.add_row(
            "epsilon per person after round" if units is not None else "epsilon per row after round",
            ", ".join(f"{k}: {e:.2f}" for k, e in p["epsilon_after_round"].items()),
        )
        table.add_row("rounds affordable", str(p["rounds_affordable"]))
        if cfg.privacy.secure_mode:
            private_engine(cfg.privacy.accountant, secure_mode=True)  # one line if it cannot be had
        table.add_row("secure mode", "on" if cfg.privacy.secure_mode else "off (experiments only)")
    else:
        table.add_row("privacy", "OFF (non-private baseline)")
    table.add_row("secure aggregation", secure_aggregation_line(cfg))
    if cfg.federation.secure_aggregation:
        table.add_row("summed securely", securely_summed(recipe.fine_tune.value, recipe.head_rounds.value))
    report.print(table)
    return 0


def securely_summed(fine_tune: bool, head_rounds: bool) -> str:
    """What of this institution's plan goes through the secure sum with a share of the noise, and what
    does not (issue 28: multi-step local training keeps its full local noise)."""
    summed = "round 0's statistics" + (" and every head round's gradient sum" if head_rounds else "")
    line = f"{summed}, each with only its share of the noise (the coordinator learns the sum)"
    if fine_tune:
        line += (
            "; its LoRA rounds (several DP-SGD steps a round) keep the full local noise and reach the "
            "coordinator unmasked, screened per reply: secure aggregation does not cover them"
        )
    return line


def secure_aggregation_line(cfg: FedloraConfig) -> str:
    """Whether this institution can take part in secure aggregation, and against which coordinator."""
    security = cfg.security
    if not security.identity_key or not security.identity_roster:
        return (
            "refused: security.identity_key and security.identity_roster are not both set (without them a "
            "coordinator could substitute keys and unmask this institution's release)"
        )
    identity = load_identity(security.identity_key, security.identity_roster)  # one line if unusable
    return (
        f"signed as '{identity.roster.names[identity.public]}', peers checked against a roster of "
        f"{len(identity.roster.names)} identities (a malicious coordinator gets only the sum; the roster, "
        "received out of band, is the trust root)"
    )


def usable_output(out: Path) -> Path:
    """Checked before anything trains or spends: a round whose adapter cannot be written is lost."""
    for path, folder in ((out, True), (out / ADAPTER, True), (out / METRICS, False)):
        if path.exists() and path.is_dir() != folder:
            kind = "a folder" if folder else "a file"
            raise ConfigError(f"--out: {path} exists and is not {kind}; expected {kind} there")
    create_folder(out, "--out")
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out: {out} is not writable")
    return out


def export_round(trainer: LocalTrainer, out: Path, metadata: dict) -> None:
    """Replace the exported adapter by this round's; a crash leaves the previous one or the new one."""
    fresh, previous, target = out / f".{ADAPTER}.new", out / f".{ADAPTER}.old", out / ADAPTER
    for stale in (fresh, previous):
        shutil.rmtree(stale, ignore_errors=True)
    export_adapter(trainer.model, fresh, metadata)
    if target.exists():
        target.rename(previous)
    fresh.rename(target)
    shutil.rmtree(previous, ignore_errors=True)


def require_finite(trainer: LocalTrainer, round_id: int, kept: str) -> None:
    bad = non_finite(adapter_state(trainer.model))
    if bad:
        raise TrainingDiverged(
            f"round {round_id} trained a non-finite adapter ({len(bad)} tensors, first {bad[0]!r}); not "
            f"exported; lower training.learning_rate, privacy.max_grad_norm or model.lora_alpha; {kept}"
        )


def cmd_train_local(args: argparse.Namespace) -> int:
    cfg = read_config(args.config, args.set, "institution")
    rounds = cfg.planned_rounds if args.rounds is None else args.rounds
    if rounds < 1:
        raise ConfigError(f"--rounds: {rounds}; expected at least 1 round")
    out = usable_output(run_folder(args.out, cfg.name))
    with tracked(args.track, out, cfg.name) as tracker:
        tracker.params(to_dict(cfg, "institution"))
        bench = prepare(cfg)
        device = device_for(cfg.training.device)
        ledger = PrivacyLedger.from_config(cfg.privacy) if cfg.privacy.enabled else None
        trainer = LocalTrainer(cfg, bench.built.model, bench.data.train, device, ledger, round_zero=False)
        metadata = {
            "fingerprint": bench.built.fingerprint,
            "labels": list(bench.labels),
            "config": to_dict(trainer.cfg),
        }
        history = []
        start = time.perf_counter()
        with progress_bar("train-local", rounds * trainer.cfg.training.local_steps) as advance:
            for r in range(1, rounds + 1):
                kept = "nothing was exported"
                if history:
                    kept = f"the adapter of round {r - 1} is in {out / ADAPTER}"
                try:
                    result = trainer.train_round(r, on_step=lambda _step, loss: advance(loss))
                except BudgetExceeded as err:
                    if not history:
                        raise
                    raise BudgetExceeded(f"stopped before round {r} of {rounds}: {err}; {kept}") from None
                require_finite(trainer, r, kept)
                export_round(trainer, out, metadata)
                row = {
                    "round": r,
                    "loss": result.loss,
                    "epsilon": result.epsilon,
                    "examples_per_second": result.examples_per_second,
                }
                if bench.data.eval is not None:
                    row.update(
                        {
                            f"eval_{k}": v
                            for k, v in evaluate(
                                trainer.model,
                                cfg.model.task,
                                bench.data.eval,
                                device,
                                cfg.training.eval_batch_size,
                            ).items()
                        }
                    )
                history.append(row)
                tracker.metrics({k: v for k, v in row.items() if k != "round"}, step=r)
                summary = {
                    "rounds": history,
                    "seconds": time.perf_counter() - start,
                    "noise_multiplier": trainer.noise_multiplier,
                    "recipe": {name: choice.value for name, choice in trainer.recipe.items()},
                    "sample_rate": trainer.sample_rate,
                }
                write_durably(out / METRICS, json.dumps(summary, indent=2).encode())
                write_model_card(out)
        tracker.artifacts([out / ADAPTER, out / METRICS])
    last = history[-1]
    shown = {k: round(v, 4) for k, v in last.items() if isinstance(v, float)}
    report.print(f"adapter written to {out / ADAPTER}; final round: {shown}")
    return 0


def audit_table(title: str, result: AuditResult) -> Table:
    table = Table(title=title)
    for column in ("canaries", "kind", "epsilon lower bound", "ceiling", "guesses (k+, k-)", "correct"):
        table.add_column(column)
    for kind, bound in (("white-box", result.white_box), ("black-box", result.black_box)):
        if bound is not None:
            table.add_row(
                str(bound.canaries),
                kind,
                f"{bound.epsilon:.3f}",
                f"{bound.ceiling:.3f}",
                f"{bound.guesses} ({bound.k_plus}, {bound.k_minus})",
                str(bound.correct),
            )
    return table


def noise_table(check: NoiseCheck) -> Table:
    table = Table(title="noise check: the noise every DP step added against the calibrated sigma x C")
    table.add_column("noise check")
    table.add_column("value")
    low, high = check.ratio_interval
    rows = (
        ("measured std", f"{check.measured_std:.4g}"),
        ("calibrated std (sigma x C)", f"{check.calibrated_std:.4g}"),
        ("ratio", f"{check.ratio:.4f} ({low:.4f}-{high:.4f} at {1 - check.false_alarm:.1%})"),
        ("samples (coordinates x steps)", str(check.samples)),
        ("chi-square, p-value", f"{check.statistic:.6g}, p = {check.p_value:.3g}"),
        ("fails below (false alarm)", f"p = {check.false_alarm:g}"),
        ("catches (with 1 - false alarm)", f"a ratio <= {check.detectable_ratio:.4f}"),
        ("passed", "yes" if check.passed else "NO: less noise than the ledger accounts for"),
    )
    for row in rows:
        table.add_row(*row)
    return table


def cmd_audit(args: argparse.Namespace) -> int:
    """Train the planned rounds with canaries on this institution's own setup and data, against a
    ledger of the audit's own in --out; fails when the measured bound exceeds the claim."""
    cfg = read_config(args.config, args.set, "institution")
    out = run_folder(args.out, f"{cfg.name}-audit")
    steps = cfg.training.local_steps  # None: the recipe plans it from the rows
    with progress_bar("audit", cfg.planned_rounds * steps if steps is not None else None) as advance:
        result = run_local_audit(
            cfg, out, args.white_box_canaries, args.black_box_canaries, lambda _step, loss: advance(loss)
        )
    claim = "none (privacy off)" if result.claimed_epsilon is None else f"{result.claimed_epsilon:.3f}"
    title = f"privacy audit: claimed epsilon {claim} (delta {result.delta:g}), {result.seconds:.0f} s"
    report.print(audit_table(title, result))
    if result.noise is not None:
        report.print(noise_table(result.noise))
    report.print(f"lower bounds at {result.white_box.confidence:.0%} confidence; written to {out}")
    require_no_leak(result, out)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Predictions for a table of new rows, with the adapter a run (or train-local) exported."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: {args.batch_size}; expected at least 1")
    decoding = Decoding(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    frame = read_table(args.input, args.format)
    inputs(frame, recorded(args.run)[2], str(args.input), args.column)  # refused before the model loads
    trained = load_trained(args.run, args.device)
    with progress_bar("predict", len(frame), loss=False) as advance:
        result = predict_frame(
            trained,
            frame,
            str(args.input),
            args.column,
            args.batch_size,
            decoding,
            on_batch=lambda rows: advance(steps=rows),
        )
    if args.out is None:
        sys.stdout.write("".join(line + "\n" for line in prediction_lines(trained, result)))
    else:
        write_predictions(result, args.out)
        console.print(f"{len(result)} predictions written to {args.out}", soft_wrap=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    out = export_merged(args.run, args.merged)
    console.print(f"merged model written to {out}", soft_wrap=True)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """The node's ECDSA P-384 key pair (OpenSSH format, as Flower expects) at security.node_private_key,
    and the institution's Ed25519 identity at security.identity_key (secure aggregation: its roster
    line printed for the federation); whichever is configured and missing, never overwriting one."""
    cfg = read_config(args.config, args.set, "institution")
    security = cfg.security
    if not security.node_private_key and not security.identity_key:
        raise ConfigError(
            f"{args.config or 'defaults'}: security.node_private_key: set where the node's key is kept "
            "(and security.identity_key, for secure aggregation)"
        )
    private = Path(security.node_private_key) if security.node_private_key else None
    node_files = [private, private.with_name(private.name + ".pub")] if private else []
    identity = Path(security.identity_key) if security.identity_key else None
    existing = [path for path in (*node_files, identity) if path is not None and path.exists()]
    if (not node_files or any(p.exists() for p in node_files)) and (identity is None or identity.exists()):
        raise FedloraError(f"{existing[0]}: already exists; refusing to replace the institution's identity")
    if node_files and not any(path.exists() for path in node_files):
        write_node_key(*node_files)
    if identity is not None and not identity.exists():
        line = f"{cfg.name}: {public_text(create_signing_key(identity))}"
        report.print(
            f"identity key written to {identity}; give the federation its roster line: {line}", soft_wrap=True
        )
    return 0


def write_node_key(private: Path, public: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    write_durably(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    write_durably(
        public,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + b"\n",
    )
    public.chmod(0o644)
    report.print(f"node key written to {private}; give the coordinator {public}", soft_wrap=True)


def cmd_start(args: argparse.Namespace) -> int:
    cfg = read_config(args.config, persona="institution")
    options = SuperNodeOptions(args.insecure, args.runtime_port, args.max_wait_time)
    supernode_command(cfg, Path(args.config), options)  # bad input is refused before anything starts
    for program in SUPERNODE_PROGRAMS:
        flower_program(program)  # the SuperNode starts them by name: refused here, not in its traceback
    if args.insecure:
        console.print("[bold yellow]warning:[/] --insecure: no TLS and no node authentication; tests only")
    console.print(f"{cfg.name}: SuperNode connecting to {cfg.federation.superlink_address}", soft_wrap=True)
    with worker_running(args.grace) as worker, own_superexec(worker, args.runtime_port, args.grace):
        cmd = supernode_command(cfg, Path(args.config), options, worker)
        run_supernode(cmd, args.grace, args.activation_patience)
    console.print(f"{cfg.name}: SuperNode stopped")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedlora-client", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate config and data; print the privacy plan")
    check.set_defaults(handler=cmd_check)
    local = sub.add_parser("train-local", help="fine-tune locally only and export the adapter")
    add_out_argument(local, "adapter and metrics")
    local.add_argument("--rounds", type=int, help="rounds of local_steps (default: planned rounds)")
    add_track_argument(local)
    local.set_defaults(handler=cmd_train_local)
    audit = sub.add_parser(
        "audit", help="measure an epsilon lower bound with canaries on this setup (its own ledger)"
    )
    add_out_argument(audit, "the audit's own ledger, canaries and result")
    audit.add_argument(
        "--white-box-canaries",
        type=int,
        default=WHITE_BOX_CANARIES,
        help="gradient canaries (audit the implementation; at most half the trained parameters)",
    )
    audit.add_argument(
        "--black-box-canaries",
        type=int,
        default=BLACK_BOX_CANARIES,
        help="input canaries (what the model alone reveals); they join the training rows; 0 for none",
    )
    audit.set_defaults(handler=cmd_audit)
    keys = sub.add_parser(
        "keys",
        help="create the node's key pair at security.node_private_key (+ .pub) and the identity key at "
        "security.identity_key, whichever is missing",
    )
    keys.set_defaults(handler=cmd_keys)
    start = sub.add_parser("start", help="join the federation: run the SuperNode until stopped")
    start.add_argument("--insecure", action="store_true", help="no TLS, no node key: local tests only")
    start.add_argument(
        "--runtime-port",
        type=int,
        default=RUNTIME_PORT,
        help="local port where the SuperNode serves its ClientApp processes (one per SuperNode per machine)",
    )
    start.add_argument(
        "--max-wait-time",
        type=float,
        help="give up after this many seconds without reaching the SuperLink (default: keep trying)",
    )
    start.add_argument(
        "--activation-patience",
        type=float,
        default=ACTIVATION_PATIENCE,
        help="seconds to keep retrying when the SuperLink refuses to activate the node (it does so for "
        "about a minute after a crash, and always for an unregistered key)",
    )
    start.add_argument(
        "--grace", type=float, default=STOP_GRACE_SECONDS, help="seconds to let the SuperNode stop"
    )
    start.set_defaults(handler=cmd_start)
    add_use_commands(sub)
    for p in (check, local, keys, audit):
        add_config_arguments(p, "institution")
    add_config_arguments(start, "institution", as_is="read as it is by the SuperNode's ClientApp processes")
    finish_help(ap, "institution", EXAMPLES["check"], EXAMPLES["start"])
    for name, command in sub.choices.items():
        finish_help(command, "institution", EXAMPLES[name])
    return ap


def add_use_commands(sub: argparse._SubParsersAction) -> None:
    """``predict`` and ``export``: use what a run trained (its folder, train-local's, or an adapter)."""
    what = "a run folder, train-local's --out folder, or an adapter folder"
    predict = sub.add_parser("predict", help="predict labels or generate responses for a table of rows")
    predict.add_argument("run", metavar="RUN_OR_ADAPTER", help=what)
    predict.add_argument("--input", required=True, help="CSV, JSONL or Parquet file of rows")
    predict.add_argument("--format", default="auto", help="input format (default: by suffix)")
    predict.add_argument(
        "--out",
        type=Path,
        help="write the rows with predictions here (.csv/.jsonl/.parquet); "
        "default: one JSON line per row on stdout",
    )
    predict.add_argument("--column", help="input column (default: the text or prompt column of training)")
    predict.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    predict.add_argument("--max-new-tokens", type=int, default=Decoding.max_new_tokens, help="causal LM")
    predict.add_argument(
        "--temperature", type=float, default=Decoding.temperature, help="causal LM; 0 decodes greedily"
    )
    predict.add_argument("--top-p", type=float, default=Decoding.top_p, help="causal LM, with sampling")
    predict.add_argument("--seed", type=int, default=Decoding.seed, help="causal LM, with sampling")
    predict.set_defaults(handler=cmd_predict)
    export = sub.add_parser("export", help="write the base with the adapter merged in, for serving")
    export.add_argument("run", metavar="RUN_OR_ADAPTER", help=what)
    export.add_argument("--merged", required=True, help="new folder for the merged Hugging Face model")
    export.set_defaults(handler=cmd_export)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
