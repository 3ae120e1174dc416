"""``fedlora-server``: the coordinator's command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.table import Table

from fedlora.common.cli_support import (
    add_config_arguments,
    console,
    finish_help,
    read_config,
    report,
    run_cli,
)
from fedlora.common.config import FedloraConfig, to_dict
from fedlora.common.devcerts import make_dev_certs
from fedlora.common.launch import STOP_GRACE_SECONDS
from fedlora.common.model import model_dir
from fedlora.common.model_card import ADAPTER_DIR
from fedlora.common.secure_aggregation.identity import load_roster
from fedlora.common.tracking import add_track_argument, tracked
from fedlora.server import deploy
from fedlora.server.history import track_history

EXAMPLES = {
    "check": "fedlora-server check coordinator.yaml",
    "start": "fedlora-server start coordinator.yaml --track",
    "status": "fedlora-server status coordinator.yaml",
    "stop": "fedlora-server stop coordinator.yaml",
    "dev-certs": "fedlora-server dev-certs certs",
}


def say(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True)


def _run_dir(args: argparse.Namespace) -> Path:
    return args.out if args.out else deploy.default_run_dir(Path(args.config))


def cmd_check(args: argparse.Namespace) -> int:
    """What `start` would refuse before starting anything: the config, the address, the TLS files, the
    admitted keys, the base model."""
    cfg = read_config(args.config, args.set, "coordinator")
    host, port = deploy.split_address(cfg.federation.superlink_address)
    folder = model_dir(cfg.model.source)
    found = {
        "config": args.config or "defaults",
        "SuperLink": f"{host}:{port} (Fleet API only; Control on loopback)",
        "federation": f"{cfg.federation.rounds} rounds, at least {cfg.federation.min_clients} institutions, "
        f"strategy {cfg.federation.strategy}, aggregator {cfg.federation.aggregator}",
        "model": cfg.model.source + (f" ({folder})" if folder else " (built from a config)"),
    }
    if args.insecure:
        found["security"] = "--insecure: no TLS, no node authentication (tests only)"
    else:
        command = deploy.superlink_command(cfg, deploy.RunFolder(Path(".")), insecure=False, port=0)
        found["TLS"] = ", ".join(command[i + 1] for i, arg in enumerate(command) if arg.startswith("--ssl-"))
        found["admitted keys"] = ", ".join(deploy.admitted_keys(cfg))
    if cfg.federation.secure_aggregation:
        found["secure aggregation"] = identities_line(cfg)
    for key, value in found.items():
        report.print(f"{key}: {value}", highlight=False, soft_wrap=True)
    return 0


def identities_line(cfg: FedloraConfig) -> str:
    """Secure aggregation's identities as the coordinator holds them (the institutions verify anyway)."""
    if not cfg.security.identity_roster:
        return (
            "signed by each institution's identity, checked by the institutions against their roster; no "
            "security.identity_roster here, so an advert of an unknown identity is relayed and the "
            "institutions refuse it (the round is discarded)"
        )
    roster = load_roster(cfg.security.identity_roster)  # one line if unusable
    return f"signed; adverts of identities outside its roster of {len(roster.names)} dropped before relaying"


def cmd_start(args: argparse.Namespace) -> int:
    cfg = read_config(args.config, persona="coordinator")
    app = deploy.find_app_dir(Path(args.app) if args.app else None)
    if args.insecure:
        say(
            "[bold yellow]warning:[/] --insecure: no TLS and no SuperNode authentication; anyone who "
            "reaches the port can join as a SuperNode. Local tests only."
        )
    run_dir = _run_dir(args)
    with tracked(args.track, run_dir, cfg.name) as tracker:
        tracker.params(to_dict(cfg, "coordinator"))
        try:
            deploy.start(cfg, Path(args.config), run_dir, app, args.insecure, say)
        finally:
            track_history(tracker, deploy.history(deploy.RunFolder(run_dir.resolve())))
        tracker.artifacts([run_dir / ADAPTER_DIR, run_dir / "history.json"])
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = deploy.status(read_config(args.config, persona="coordinator"), _run_dir(args))
    table = Table(show_header=False)
    for key, value in state.items():
        table.add_row(key, value)
    report.print(table)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    pid = deploy.stop(_run_dir(args), args.grace)
    stopped = f"SuperLink (pid {pid}) stopped" if pid is not None else "no SuperLink was running for this run"
    report.print(stopped, highlight=False, soft_wrap=True)
    return 0


def cmd_dev_certs(args: argparse.Namespace) -> int:
    certs = make_dev_certs(args.out_dir)
    report.print(
        f"development CA and server certificate for localhost written to {args.out_dir}; in the "
        f"coordinator's YAML: security.ca_cert: {certs.ca_cert}, server_cert: {certs.server_cert}, "
        f"server_key: {certs.server_key}; give institutions {certs.ca_cert} only",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedlora-server", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate the config, certificates and admitted keys; start nothing")
    add_config_arguments(check, "coordinator")
    check.add_argument("--insecure", action="store_true", help="check as `start --insecure` would run")
    check.set_defaults(handler=cmd_check)
    start = sub.add_parser("start", help="start the SuperLink, admit the institutions, run the federation")
    start.add_argument("--insecure", action="store_true", help="no TLS, no node authentication: tests only")
    start.add_argument("--app", help="the Flower App folder (fedlora's pyproject.toml; default: found)")
    add_track_argument(start)
    start.set_defaults(handler=cmd_start)
    status = sub.add_parser("status", help="rounds done, and whether the SuperLink runs")
    status.set_defaults(handler=cmd_status)
    stop = sub.add_parser("stop", help="stop the SuperLink (SIGTERM, then SIGKILL after --grace)")
    stop.add_argument("--grace", type=float, default=STOP_GRACE_SECONDS, help="seconds to let it stop")
    stop.set_defaults(handler=cmd_stop)
    for p in (start, status, stop):
        add_config_arguments(p, "coordinator", as_is="read as it is by the ServerApp; it names the run")
        p.add_argument(
            "--out",
            type=Path,
            help="the run folder: checkpoints, adapter, history, the SuperLink's state (default: run/ beside "
            "the config)",
        )
    certs = sub.add_parser("dev-certs", help="a local CA and server certificate, to try TLS on one machine")
    certs.add_argument("out_dir", help="folder for ca.crt, server.pem, server.key")
    certs.set_defaults(handler=cmd_dev_certs)
    finish_help(ap, "coordinator", EXAMPLES["check"], EXAMPLES["start"])
    for name, command in sub.choices.items():
        finish_help(command, "coordinator", EXAMPLES[name])
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
