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

from fedlora.client.daemon import (
    ACTIVATION_PATIENCE,
    RUNTIME_PORT,
    SuperNodeOptions,
    run_supernode,
    supernode_command,
)
from fedlora.client.ledger import PrivacyLedger, require_meaningful_delta
from fedlora.client.recipe import Recipe, applied, facts
from fedlora.client.recipe import plan as plan_recipe
from fedlora.client.trainer import LocalTrainer
from fedlora.common.adapter import export_adapter, non_finite
from fedlora.common.cli_support import console, progress_bar, read_config, report, run_cli
from fedlora.common.config import FedloraConfig, to_dict
from fedlora.common.durable import write_durably
from fedlora.common.errors import BudgetExceeded, ConfigError, FedloraError, TrainingDiverged
from fedlora.common.launch import STOP_GRACE_SECONDS
from fedlora.common.model import device_for
from fedlora.common.scoring import evaluate
from fedlora.common.workbench import prepare

ADAPTER, METRICS = "adapter", "metrics.json"


MAX_REPORTED_POINTS = 10


def reported_rounds(planned: int) -> list[int]:
    """At most MAX_REPORTED_POINTS evenly spaced rounds and the last: each is one composition."""
    step = max(1, planned // MAX_REPORTED_POINTS)
    return sorted({*range(step, planned + 1, step), planned})


def plan(cfg: FedloraConfig, rows: int, labels: int) -> tuple[Recipe, dict | None]:
    """The recipe for this institution's counts, and with DP what the budget buys from the ledger's
    state: noise, and epsilon after some planned rounds (a head start still to come included)."""
    if not cfg.privacy.enabled:
        return plan_recipe(facts(cfg, rows, labels), cfg), None
    require_meaningful_delta(cfg.privacy.delta, rows)
    ledger = PrivacyLedger.from_config(cfg.privacy)
    recipe = plan_recipe(facts(cfg, rows, labels), cfg, ledger.noise_multiplier)
    cfg = applied(cfg, recipe)
    sample_rate = recipe.sample_rate.value
    steps = cfg.training.local_steps
    # As the trainer does: a head start runs only on a fresh ledger, composed before the rounds.
    first = recipe.head_start_history() if not ledger.entries else ()
    noise = ledger.calibrate(sample_rate, cfg.planned_rounds * steps, also=recipe.head_start_history())
    after = {
        k: ledger.projected(noise, sample_rate, steps * k, first) for k in reported_rounds(cfg.planned_rounds)
    }
    budget = {
        "sample_rate": sample_rate,
        "noise_multiplier": noise,
        "steps_per_round": steps,
        "spent": ledger.spent,
        "epsilon_after_round": after,
        "rounds_affordable": ledger.rounds_affordable(
            sample_rate, steps, limit=max(10_000, 2 * cfg.planned_rounds), also=first
        ),
    }
    return recipe, budget


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
    recipe, p = plan(cfg, len(data.train), len(data.labels))
    table.add_row("recipe", cfg.training.recipe)
    for name, choice in recipe.items():
        table.add_row(name.replace("_", " "), f"{_shown(choice.value)}: {choice.reason}")
    if p is not None:
        table.add_row("spent so far", f"epsilon {p['spent']:.3f} of {cfg.privacy.epsilon:g}")
        table.add_row(
            "epsilon after round",
            ", ".join(f"{k}: {e:.2f}" for k, e in p["epsilon_after_round"].items()),
        )
        table.add_row("rounds affordable", str(p["rounds_affordable"]))
    else:
        table.add_row("privacy", "OFF (non-private baseline)")
    report.print(table)
    return 0


def usable_output(out: Path) -> Path:
    """Checked before anything trains or spends: a round whose adapter cannot be written is lost."""
    for path, folder in ((out, True), (out / ADAPTER, True), (out / METRICS, False)):
        if path.exists() and path.is_dir() != folder:
            kind = "a folder" if folder else "a file"
            raise ConfigError(f"--out: {path} exists and is not {kind}; expected {kind} there")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out: cannot create {out} ({err.strerror or err})") from None
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
    bad = non_finite(trainer.adapter())
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
    out = usable_output(Path(args.out))
    bench = prepare(cfg)
    device = device_for(cfg.training.device)
    ledger = PrivacyLedger.from_config(cfg.privacy) if cfg.privacy.enabled else None
    trainer = LocalTrainer(cfg, bench.built.model, bench.data.train, device, ledger)
    metadata = {
        "fingerprint": bench.built.fingerprint,
        "labels": list(bench.labels),
        "config": to_dict(trainer.cfg),
    }
    history = []
    start = time.perf_counter()
    with progress_bar("train-local", rounds * trainer.cfg.training.local_steps) as advance:
        for r in range(1, rounds + 1):
            kept = (
                f"the adapter of round {r - 1} is in {out / ADAPTER}" if history else "nothing was exported"
            )
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
            summary = {
                "rounds": history,
                "seconds": time.perf_counter() - start,
                "noise_multiplier": trainer.noise_multiplier,
                "recipe": {name: choice.value for name, choice in trainer.recipe.items()},
                "sample_rate": trainer.sample_rate,
            }
            write_durably(out / METRICS, json.dumps(summary, indent=2).encode())
    last = history[-1]
    shown = {k: round(v, 4) for k, v in last.items() if isinstance(v, float)}
    report.print(f"adapter written to {out / ADAPTER}; final round: {shown}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """The node's ECDSA P-384 key pair (OpenSSH format, as Flower expects); never overwrites one."""
    cfg = read_config(args.config, persona="institution")
    if not cfg.security.node_private_key:
        raise ConfigError(f"{args.config}: security.node_private_key: set where the node's key is kept")
    private = Path(cfg.security.node_private_key)
    public = private.with_name(private.name + ".pub")
    for path in (private, public):
        if path.exists():
            raise FedloraError(f"{path}: already exists; refusing to replace the institution's identity")
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
    console.print(f"node key written to {private}; give the coordinator {public}", soft_wrap=True)
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    """No --set here: the ClientApp reads the YAML file itself, so it alone must say everything."""
    cfg = read_config(args.config, persona="institution")
    options = SuperNodeOptions(args.insecure, args.runtime_port, args.max_wait_time)
    cmd = supernode_command(cfg, Path(args.config), options)
    if args.insecure:
        console.print("[bold yellow]warning:[/] --insecure: no TLS and no node authentication; tests only")
    console.print(f"{cfg.name}: SuperNode connecting to {cfg.federation.superlink_address}", soft_wrap=True)
    run_supernode(cmd, args.grace, args.activation_patience)
    console.print(f"{cfg.name}: SuperNode stopped")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedlora-client", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate config and data; print the privacy plan")
    check.set_defaults(handler=cmd_check)
    local = sub.add_parser("train-local", help="fine-tune locally only and export the adapter")
    local.add_argument("--out", required=True, help="output folder (adapter, metrics, ledger)")
    local.add_argument("--rounds", type=int, help="rounds of local_steps (default: planned rounds)")
    local.set_defaults(handler=cmd_train_local)
    keys = sub.add_parser("keys", help="create the node's key pair at security.node_private_key (+ .pub)")
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
    for p in (keys, start):
        p.add_argument("config", help="the institution's YAML config")
    for p in (check, local):
        p.add_argument("config", nargs="?", help="the institution's YAML config (default: built-in)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. privacy.epsilon=4",
        )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
