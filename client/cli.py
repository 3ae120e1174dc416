"""``fedlora-client``: the institution's command."""

from __future__ import annotations

import argparse
import json
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
from fedlora.client.ledger import PrivacyLedger
from fedlora.client.trainer import LocalTrainer, poisson_rate
from fedlora.common.adapter import export_adapter
from fedlora.common.cli_support import console, progress_bar, read_config, report, run_cli
from fedlora.common.config import FedloraConfig, to_dict
from fedlora.common.durable import write_durably
from fedlora.common.errors import ConfigError, FedloraError
from fedlora.common.launch import STOP_GRACE_SECONDS
from fedlora.common.model import device_for
from fedlora.common.scoring import evaluate
from fedlora.common.workbench import prepare


def open_ledger(cfg: FedloraConfig) -> PrivacyLedger:
    p = cfg.privacy
    return PrivacyLedger(p.ledger_path, p.epsilon, p.delta, p.accountant)


def plan(cfg: FedloraConfig, rows: int) -> dict:
    """What the budget buys: noise, and epsilon after each planned round, from the ledger's state."""
    ledger = open_ledger(cfg)
    sample_rate = poisson_rate(rows, cfg.training.batch_size)
    steps = cfg.training.local_steps
    noise = ledger.calibrate(sample_rate, cfg.planned_rounds * steps)
    after = [ledger.projected(noise, sample_rate, steps * k) for k in range(1, cfg.planned_rounds + 1)]
    return {
        "sample_rate": sample_rate,
        "noise_multiplier": noise,
        "steps_per_round": steps,
        "spent": ledger.spent,
        "epsilon_after_round": after,
        "rounds_affordable": ledger.rounds_affordable(sample_rate, steps),
    }


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
    if cfg.privacy.enabled:
        p = plan(cfg, len(data.train))
        table.add_row("sample rate", f"{p['sample_rate']:.4f}")
        table.add_row("noise multiplier", f"{p['noise_multiplier']:.4f}")
        table.add_row("spent so far", f"epsilon {p['spent']:.3f} of {cfg.privacy.epsilon:g}")
        table.add_row(
            "epsilon after round",
            ", ".join(f"{i + 1}: {e:.2f}" for i, e in enumerate(p["epsilon_after_round"])),
        )
        table.add_row("rounds affordable", str(p["rounds_affordable"]))
    else:
        table.add_row("privacy", "OFF (non-private baseline)")
    report.print(table)
    return 0


def cmd_train_local(args: argparse.Namespace) -> int:
    cfg = read_config(args.config, args.set, "institution")
    out = Path(args.out)
    bench = prepare(cfg)
    device = device_for(cfg.training.device)
    ledger = open_ledger(cfg) if cfg.privacy.enabled else None  # the institution's one ledger
    trainer = LocalTrainer(cfg, bench.built.model, bench.data.train, device, ledger)
    rounds = args.rounds or cfg.planned_rounds
    history = []
    start = time.perf_counter()
    with progress_bar("train-local", rounds * cfg.training.local_steps) as advance:
        for r in range(1, rounds + 1):
            result = trainer.train_round(r, on_step=lambda _step, loss: advance(loss))
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
    metadata = {"fingerprint": bench.built.fingerprint, "labels": list(bench.labels), "config": to_dict(cfg)}
    export_adapter(trainer.model, out / "adapter", metadata)
    summary = {
        "rounds": history,
        "seconds": time.perf_counter() - start,
        "noise_multiplier": trainer.noise_multiplier,
        "sample_rate": trainer.sample_rate,
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    last = history[-1]
    shown = {k: round(v, 4) for k, v in last.items() if isinstance(v, float)}
    report.print(f"adapter written to {out / 'adapter'}; final round: {shown}")
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
