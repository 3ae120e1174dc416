"""``fedlora-client``: the institution's command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.table import Table

from fedlora.client.ledger import PrivacyLedger
from fedlora.client.trainer import LocalTrainer
from fedlora.common.adapter import export_adapter
from fedlora.common.cli_support import console, progress_bar, read_config, run_cli
from fedlora.common.config import FedloraConfig, to_dict
from fedlora.common.model import device_for
from fedlora.common.scoring import evaluate
from fedlora.common.workbench import prepare


def open_ledger(cfg: FedloraConfig, path: str | None = None) -> PrivacyLedger:
    p = cfg.privacy
    return PrivacyLedger(path or p.ledger_path, p.epsilon, p.delta, p.accountant)


def plan(cfg: FedloraConfig, rows: int) -> dict:
    """What the budget buys: noise, and epsilon after each planned round, from the ledger's state."""
    ledger = open_ledger(cfg)
    sample_rate = min(1.0, cfg.training.batch_size / rows)
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
    cfg = read_config(args.config, args.set)
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
    console.print(table)
    return 0


def cmd_train_local(args: argparse.Namespace) -> int:
    cfg = read_config(args.config, args.set)
    out = Path(args.out)
    bench = prepare(cfg)
    device = device_for(cfg.training.device)
    ledger = open_ledger(cfg, str(out / "privacy-ledger.json")) if cfg.privacy.enabled else None
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
    console.print(f"adapter written to {out / 'adapter'}; final round: {shown}")
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
