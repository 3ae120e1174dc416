"""Per-round client overhead in deployment beyond training: the base model reloaded for every message
(each ``flwr-clientapp`` handles the message itself) vs kept loaded in the institution's worker.

Both modes run the same real deployment on 127.0.0.1, one after the other: dev certificates (TLS),
node authentication, the coordinator (``fedlora-server start``), one institution's SuperNode with the
same YAML; only the worker differs. Every round trains and then evaluates. A round's overhead is its
wall time (the coordinator's history) minus the training time the client reports; round 1 loads the
model in both modes and is shown apart. Then, alternately, what a message costs in a fresh process
before any training: fedlora's ClientApp loading everything vs the relay alone.

    python -m benchmarks deployment_overhead [--model smollm2] [--rounds 4]
        [--rows 8] [--steps 1] [--repeats 3] [--per-message-only]
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

import yaml
from rich.table import Table

from benchmarks import PROG
from fedlora.client import cli as client_cli
from fedlora.client.daemon import SuperNodeOptions, supernode_command
from fedlora.common.cli_support import console, report, run_cli
from fedlora.common.config import PERSONAS, load_config
from fedlora.common.devcerts import make_dev_certs
from fedlora.common.errors import FedloraError
from fedlora.common.launch import flower_env, start_child, stop_child
from fedlora.common.model import model_dir

DATA = files("fedlora.configs") / "data"
# What a message costs the institution's side before any training, in a fresh process: fedlora's
# ClientApp reloading everything (before), or the relay alone (after: the worker keeps the model).
RELOAD = """
import sys
from fedlora.client.app import shared_data
from fedlora.common.config import load_config
from fedlora.common.model import build_model
cfg = load_config(sys.argv[1], persona="institution")
tokenizer, bundle = shared_data(cfg)
build_model(cfg.model, bundle.labels, len(tokenizer))
"""
RELAY = "import fedlora.client.relay"
MODES = ("reloaded per message", "kept loaded (worker)")
RUN_TIMEOUT = 1800


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slice(source: Traversable, rows: int, out: Path) -> str:
    out.write_text("".join(source.read_text().splitlines(keepends=True)[:rows]))
    return out.name


def federation(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The coordinator's and the institution's YAMLs, certificates and node key under ``root``."""
    certs = make_dev_certs(root / "certs")
    fed = {
        "superlink_address": f"127.0.0.1:{free_port()}",
        "rounds": args.rounds,
        "min_clients": 1,
        "fraction_evaluate": 1.0,
        "round_timeout": 600,
        "node_wait_timeout": 300,
    }
    model = {"source": args.model, "task": "causal-lm", "lora_r": 8, "lora_alpha": 16}
    folder = root / "institution"
    folder.mkdir()
    own = PERSONAS["institution"].keys
    institution = {
        "name": "institution",
        "model": model,
        "data": {
            "path": _slice(DATA / "bank-assistant-train.jsonl", args.rows, folder / "train.jsonl"),
            "eval_path": _slice(DATA / "bank-assistant-eval.jsonl", args.rows, folder / "eval.jsonl"),
            "prompt_column": "prompt",
            "response_column": "response",
            "max_length": 48,
        },
        "training": {"local_steps": args.steps, "batch_size": 4, "device": "cpu"},
        "privacy": {"epsilon": 8, "delta": 1e-4, "ledger_path": "ledger.json"},
        "federation": {k: v for k, v in fed.items() if f"federation.{k}" in own},
        "security": {"ca_cert": str(certs.ca_cert), "node_private_key": "node.key"},
    }
    config = folder / "institution.yaml"
    config.write_text(yaml.safe_dump(institution))
    if client_cli.main(["keys", str(config)]) != 0:
        raise FedloraError(f"{config}: could not create the node key")
    coordinator = {
        "name": "coordinator",
        "model": model,
        "training": {"device": "cpu"},
        "federation": fed,
        "security": {
            "ca_cert": str(certs.ca_cert),
            "server_cert": str(certs.server_cert),
            "server_key": str(certs.server_key),
            "node_public_keys": [str(folder / "node.key.pub")],
        },
    }
    server = root / "coordinator.yaml"
    server.write_text(yaml.safe_dump(coordinator))
    return server, config


def one_run(root: Path, args: argparse.Namespace, keep_loaded: bool) -> list[tuple[float, float]]:
    """(wall seconds, training seconds) of each round of one deployment."""
    server_yaml, config = federation(root, args)
    cfg = load_config(str(config), persona="institution")
    env = flower_env()
    logs, run_dir, port = root / "logs", root / "run", free_port()
    if keep_loaded:  # the institution's own command: its SuperNode and its worker
        institution = [
            sys.executable,
            "-m",
            "fedlora.client.cli",
            "start",
            str(config),
            "--runtime-port",
            str(port),
        ]
    else:  # the SuperNode alone: every flwr-clientapp handles its message itself
        institution = supernode_command(cfg, config, SuperNodeOptions(runtime_port=port))
    coordinator = [
        sys.executable,
        "-m",
        "fedlora.server.cli",
        "start",
        str(server_yaml),
        "--out",
        str(run_dir),
    ]
    with ExitStack() as stack:
        server = start_child(coordinator, env, logs / "server.log")
        stack.callback(stop_child, server, 20)
        node = start_child(institution, env, logs / "institution.log")
        stack.callback(stop_child, node, 20)
        try:
            code = server.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise FedloraError(f"the deployment did not finish within {RUN_TIMEOUT} s; see {logs}") from None
        if code != 0:
            raise FedloraError(f"fedlora-server exited with {code}; see {logs / 'server.log'}")
    return round_times(run_dir)


def round_times(run_dir: Path) -> list[tuple[float, float]]:
    """(wall seconds, training seconds of the slowest client) of each round in the run's history."""
    history = json.loads((run_dir / "history.json").read_text())
    rounds = []
    for before, entry in itertools.pairwise(history):
        train = max((c["train-seconds"] for c in entry["clients"]), default=float("nan"))
        rounds.append((entry["time"] - before["time"], train))
    return rounds


def fresh_process_seconds(code: str, config: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code, str(config)], env=flower_env(), check=True, capture_output=True
    )
    return time.perf_counter() - start


def per_message(config: Path, repeats: int) -> Table:
    """A fresh process's cost per message, before and after, measured alternately."""
    before, after = [], []
    for _ in range(repeats):
        before.append(fresh_process_seconds(RELOAD, config))
        after.append(fresh_process_seconds(RELAY, config))
    t = Table(title=f"per message, a fresh process (x{repeats}, alternating)")
    t.add_column("ClientApp process")
    t.add_column("seconds", justify="right")
    t.add_row("imports fedlora's ClientApp, loads tokenizer, data, base model", _spread(before))
    t.add_row("imports the relay (the worker keeps the model)", _spread(after))
    return t


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def table(results: dict[str, list[tuple[float, float]]], rounds: int) -> Table:
    t = Table(title=f"per-round client overhead beyond training ({rounds} rounds, train + evaluate each)")
    # r1: round 1 (the model is loaded in both modes); r2+: the mean of the later rounds
    for column in ("mode", "r1 wall", "r1 overhead", "r2+ wall", "r2+ training", "r2+ overhead"):
        t.add_column(column, justify="left" if column == "mode" else "right")
    for mode, rows in results.items():
        later = rows[1:] or rows
        t.add_row(
            mode,
            f"{rows[0][0]:.1f} s",
            f"{rows[0][0] - rows[0][1]:.1f} s",
            f"{statistics.mean(w for w, _ in later):.1f} s",
            f"{statistics.mean(s for _, s in later):.1f} s",
            f"{statistics.mean(w - s for w, s in later):.1f} s",
        )
    return t


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{PROG} deployment_overhead", description=__doc__)
    ap.add_argument("--model", default="smollm2", help="model.source of a causal LM (default smollm2)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rows", type=int, default=8, help="training and evaluation rows of the institution")
    ap.add_argument("--steps", type=int, default=1, help="training.local_steps")
    ap.add_argument("--repeats", type=int, default=3, help="of the per-message measurement")
    ap.add_argument("--per-message-only", action="store_true", help="skip the two deployments")
    return ap


def run(args: argparse.Namespace) -> int:
    model_dir(args.model)  # a one-off conversion (SmolLM2's GGUF file) is not part of either mode
    results = {}
    with tempfile.TemporaryDirectory(prefix="fedlora-deploy-bench-") as tmp:
        for mode, keep in zip(MODES, (False, True), strict=True):
            if args.per_message_only:
                break
            console.print(f"{mode}: {args.rounds} rounds of a real deployment on 127.0.0.1 ...")
            results[mode] = one_run(Path(tmp) / mode.split()[0], args, keep)
            for i, (wall, train) in enumerate(results[mode], 1):
                console.print(f"  round {i}: {wall:.1f} s wall, {train:.1f} s training")
        console.print("per message: fresh processes, alternately ...")
        _, config = federation(Path(tmp) / "per-message", args)
        message_costs = per_message(config, args.repeats)
    if results:
        report.print(table(results, args.rounds))
        before, after = (statistics.mean(w - s for w, s in rows[1:] or rows) for rows in results.values())
        report.print(f"overhead per round after the first: {before:.1f} s -> {after:.1f} s")
    report.print(message_costs)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_cli(lambda: run(args))
