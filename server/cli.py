"""``fedlora-server``: the coordinator's command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.table import Table

from fedlora.common.cli_support import console, read_config, run_cli
from fedlora.common.devcerts import make_dev_certs
from fedlora.common.launch import STOP_GRACE_SECONDS
from fedlora.server import deploy


def say(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True)


def _run_dir(args: argparse.Namespace) -> Path:
    return Path(args.run_dir) if args.run_dir else deploy.default_run_dir(Path(args.config))


def cmd_start(args: argparse.Namespace) -> int:
    """No --set here: the ServerApp reads the YAML file itself, so it alone must say everything."""
    cfg = read_config(args.config, persona="coordinator")
    app = deploy.find_app_dir(Path(args.app) if args.app else None)
    if args.insecure:
        say(
            "[bold yellow]warning:[/] --insecure: no TLS and no SuperNode authentication; anyone who "
            "reaches the port can join or submit runs. Local tests only."
        )
    deploy.start(cfg, Path(args.config), _run_dir(args), app, args.insecure, say)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    report = deploy.status(read_config(args.config, persona="coordinator"), _run_dir(args))
    table = Table(show_header=False)
    for key, value in report.items():
        table.add_row(key, value)
    console.print(table)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    pid = deploy.stop(_run_dir(args), args.grace)
    say(f"SuperLink (pid {pid}) stopped" if pid is not None else "no SuperLink was running for this run")
    return 0


def cmd_dev_certs(args: argparse.Namespace) -> int:
    certs = make_dev_certs(args.out_dir)
    say(
        f"development CA and server certificate for localhost written to {args.out_dir}; in the "
        f"coordinator's YAML: security.ca_cert: {certs.ca_cert}, server_cert: {certs.server_cert}, "
        f"server_key: {certs.server_key}; give institutions {certs.ca_cert} only"
    )
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedlora-server", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start the SuperLink, admit the institutions, run the federation")
    start.add_argument("--insecure", action="store_true", help="no TLS, no node authentication: tests only")
    start.add_argument("--app", help="the Flower App folder (fedlora's pyproject.toml; default: found)")
    start.set_defaults(handler=cmd_start)
    status = sub.add_parser("status", help="rounds done, and whether the SuperLink runs")
    status.set_defaults(handler=cmd_status)
    stop = sub.add_parser("stop", help="stop the SuperLink (SIGTERM, then SIGKILL after --grace)")
    stop.add_argument("--grace", type=float, default=STOP_GRACE_SECONDS, help="seconds to let it stop")
    stop.set_defaults(handler=cmd_stop)
    for p in (start, status, stop):
        p.add_argument("config", help="the coordinator's YAML config")
        p.add_argument("--run-dir", help="the run folder (default: run/ beside the config)")
    certs = sub.add_parser("dev-certs", help="a local CA and server certificate, to try TLS on one machine")
    certs.add_argument("out_dir", help="folder for ca.crt, server.pem, server.key")
    certs.set_defaults(handler=cmd_dev_certs)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
