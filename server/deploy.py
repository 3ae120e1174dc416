"""The coordinator's SuperLink: start it secured, admit the institutions, submit the run, follow it.

The SuperLink listens on loopback only (a free port chosen at each start): its one HTTP port also
serves Flower's Control API, which authenticates no one, so only this machine may reach it. The
federation's address is served by the Fleet gate (server.fleet_gate), a child of `fedlora-server
start` that passes SuperNodes' Fleet calls through and nothing else. No party but the coordinator can
start a run: no foreign ServerApp runs in this folder, and ``flwr log`` answers only here.

Everything lives in the run folder's ``superlink/``: the SuperLink's state database (so a restarted
SuperLink still knows the admitted nodes, and their SuperNodes reconnect on their own), its log and
pid file, the ServerApp's log, and the FLWR_HOME whose config.toml tells ``flwr`` how to reach it.
Starting again on a folder with a checkpoint resumes after its last complete round (server.app).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_ssh_public_key

import fedlora.server
from fedlora.common import protocol as P
from fedlora.common.config import FedloraConfig
from fedlora.common.durable import write_durably
from fedlora.common.errors import CheckpointError, ConfigError, FedloraError
from fedlora.common.launch import (
    STOP_GRACE_SECONDS,
    config_pairs,
    flower_env,
    flower_program,
    interrupt_pid,
    pid_alive,
    plain,
    read_number,
    sigterm_as_interrupt,
    start_child,
    stop_child,
    stop_pid,
    write_number,
)
from fedlora.server.checkpoint import POINTER, load_checkpoint
from fedlora.server.history import summarise_round

CONNECTION = "fedlora"
SUPERLINK = "flower-superlink"
SUPERVISOR = "fedlora"
READY_SECONDS = 60.0
FLWR_SECONDS = 120.0
FOLLOW_POLL_SECONDS = 1.0
STATUS_POLL_SECONDS = 10.0
COMPLETED = "finished:completed"
LOOPBACK = "127.0.0.1"
Say = Callable[[str], None]


@dataclass(frozen=True)
class RunFolder:
    """Where one federation keeps its files; server.app writes checkpoint/, adapter/, history.json."""

    root: Path

    @property
    def work(self) -> Path:
        return self.root / "superlink"

    @property
    def flwr_home(self) -> Path:
        return self.work / "flwr-home"

    @property
    def pid_file(self) -> Path:
        return self.work / "superlink.pid"

    @property
    def superlink_log(self) -> Path:
        return self.work / "superlink.log"

    @property
    def supervisor_pid_file(self) -> Path:
        return self.work / "start.pid"

    @property
    def gate_log(self) -> Path:
        return self.work / "fleet-gate.log"

    @property
    def serverapp_log(self) -> Path:
        return self.work / "serverapp.log"

    @property
    def run_id_file(self) -> Path:
        return self.work / "run-id"

    @property
    def node_ids_file(self) -> Path:
        return self.work / "node-ids.json"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    def superlink_pid(self) -> int | None:
        """The pid of this folder's SuperLink if it is running."""
        pid = read_number(self.pid_file)
        return pid if pid is not None and pid_alive(pid, SUPERLINK) else None

    def supervisor_pid(self) -> int | None:
        """The pid of the `fedlora-server start` serving this folder, if it is running."""
        pid = read_number(self.supervisor_pid_file)
        return pid if pid is not None and pid_alive(pid, SUPERVISOR) else None


def default_run_dir(config_path: Path) -> Path:
    """Beside the config, as server.app assumes when the run config names no run folder."""
    return config_path.resolve().parent / "run"


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"federation.superlink_address: expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def reachable_address(address: str) -> str:
    """Where this machine reaches a server listening on ``address`` (all interfaces: via loopback)."""
    host, port = split_address(address)
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "::") else address


def loopback_port(avoid: int) -> int:
    """A free port on loopback for the SuperLink (the OS's choice), never the gate's ``avoid``."""
    while True:
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        if port != avoid:
            return port


def find_app_dir(explicit: Path | None = None) -> Path:
    """The Flower App folder (fedlora's pyproject.toml) that ``flwr run`` packs: given, or found
    above the installed package (an editable install or a source checkout)."""
    candidates = [explicit] if explicit is not None else Path(fedlora.server.__file__).resolve().parents
    for folder in candidates:
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text(encoding="utf-8"):
            return folder
    where = explicit or Path(fedlora.server.__file__).parent
    raise FedloraError(f"{where}: no pyproject.toml with [tool.flwr.app] here or above; pass --app DIR")


def _tls_file(path: str | None, key: str) -> str:
    hint = "`fedlora-server dev-certs DIR` makes local ones to try things out"
    if not path:
        raise ConfigError(f"security.{key}: not set; TLS needs it ({hint}), or pass --insecure")
    if not Path(path).is_file():
        raise ConfigError(f"security.{key}: {path} does not exist ({hint})")
    return path


def admitted_keys(cfg: FedloraConfig) -> list[str]:
    keys = list(cfg.security.node_public_keys)
    if not keys:
        raise ConfigError("security.node_public_keys: no institution is admitted; list their .pub files")
    missing = [k for k in keys if not Path(k).is_file()]
    if missing:
        raise ConfigError(f"security.node_public_keys: {missing[0]} does not exist")
    return keys


def superlink_command(cfg: FedloraConfig, folder: RunFolder, insecure: bool, port: int) -> list[str]:
    """The SuperLink on loopback ``port``: Fleet, Control and Runtime APIs for this machine only."""
    split_address(cfg.federation.superlink_address)  # refused before anything starts: the gate's address
    cmd = [
        flower_program(SUPERLINK),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--database",
        str(folder.work / "state.db"),
        "--disable-runtime-dependency-installation",
    ]
    if insecure:
        return [*cmd, "--insecure"]
    sec = cfg.security
    return [
        *cmd,
        "--ssl-ca-certfile",
        _tls_file(sec.ca_cert, "ca_cert"),
        "--ssl-certfile",
        _tls_file(sec.server_cert, "server_cert"),
        "--ssl-keyfile",
        _tls_file(sec.server_key, "server_key"),
        "--enable-supernode-auth",
    ]


def gate_command(cfg: FedloraConfig, insecure: bool, port: int) -> list[str]:
    """The Fleet gate on the federation's address, in front of the SuperLink on loopback ``port``."""
    host, public_port = split_address(cfg.federation.superlink_address)
    cmd = [sys.executable, "-m", "fedlora.server.fleet_gate", "--host", host, "--port", str(public_port)]
    cmd += ["--parent-pid", str(os.getpid())]
    if insecure:
        return [*cmd, "--upstream", f"http://{LOOPBACK}:{port}"]
    sec = cfg.security
    return [
        *cmd,
        "--upstream",
        f"https://{LOOPBACK}:{port}",
        "--certfile",
        _tls_file(sec.server_cert, "server_cert"),
        "--keyfile",
        _tls_file(sec.server_key, "server_key"),
        "--ca",
        _tls_file(sec.ca_cert, "ca_cert"),
    ]


def write_connection(cfg: FedloraConfig, folder: RunFolder, insecure: bool, port: int) -> None:
    """FLWR_HOME/config.toml: the one connection the ``flwr`` commands of this run use, on loopback
    (the server certificate must name 127.0.0.1, as `fedlora-server dev-certs` makes it)."""
    address = f"{LOOPBACK}:{port}"
    if insecure:
        security = "insecure = true"
    else:
        ca = Path(_tls_file(cfg.security.ca_cert, "ca_cert")).resolve()
        security = f"root-certificates = {json.dumps(str(ca))}"
    folder.flwr_home.mkdir(parents=True, exist_ok=True)
    (folder.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n'
    )


def flwr(folder: RunFolder, *args: str) -> dict:
    """Run a ``flwr`` command against this run's SuperLink; its JSON answer, or one-line error."""
    cmd = [flower_program("flwr"), *args, "--format", "json"]
    try:
        done = subprocess.run(
            cmd, env=flower_env(folder.flwr_home), capture_output=True, text=True, timeout=FLWR_SECONDS
        )
    except subprocess.TimeoutExpired:
        raise FedloraError(f"flwr {' '.join(args[:2])}: no answer within {FLWR_SECONDS:g} s") from None
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        said = [text for text in map(plain, (done.stderr + done.stdout).splitlines()) if text]
        detail = said[-1] if said else "no output"
        raise FedloraError(f"flwr {' '.join(args[:2])}: exit code {done.returncode}: {detail}") from None


def _failed(args: tuple[str, ...], answer: dict) -> FedloraError:
    message = " ".join(plain(line) for line in str(answer.get("error-message", "")).splitlines() if line)
    return FedloraError(f"flwr {' '.join(args[:2])}: {message or 'failed'}")


def key_identity(key: str) -> str:
    """A public key as Flower compares it (type and value, without the file's comment)."""
    try:
        public = load_ssh_public_key(Path(key).read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"security.node_public_keys: {key} is not an OpenSSH public key ({err})") from None
    return public.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


def read_node_ids(folder: RunFolder) -> dict[str, int]:
    """The node id the SuperLink gave each public key (``flwr supernode ls`` does not show keys)."""
    if not folder.node_ids_file.exists():
        return {}
    try:
        return {str(k): int(v) for k, v in json.loads(folder.node_ids_file.read_text()).items()}
    except (ValueError, AttributeError) as err:
        raise FedloraError(f"{folder.node_ids_file}: unreadable ({err}); move superlink/ aside") from None


def registered_nodes(folder: RunFolder) -> dict[int, str]:
    """Every node in the SuperLink's registry, with its status ("unregistered" once revoked)."""
    args = ("supernode", "ls", CONNECTION)
    answer = flwr(folder, *args)
    if not answer.get("success"):
        raise _failed(args, answer)
    return {int(node["node-id"]): str(node["status"]) for node in answer.get("nodes", [])}


def _admit(folder: RunFolder, key: str, known: dict[str, int], listed: dict[int, str], say: Say) -> int:
    identity = key_identity(key)
    args = ("supernode", "register", key, CONNECTION)
    answer = flwr(folder, *args)
    if answer.get("success"):
        known[identity] = int(answer["node-id"])
        write_durably(folder.node_ids_file, json.dumps(known, indent=1).encode())
        say(f"admitted {key} as node {known[identity]}")
        return known[identity]
    if "already in use" not in str(answer.get("error-message", "")):
        raise _failed(args, answer)
    node = known.get(identity)
    if node is None:
        raise FedloraError(
            f"{key}: registered with this SuperLink, but {folder.node_ids_file} does not say as which node, "
            f"so a revoked key could not be told apart; move {folder.work / 'state.db'} aside to register "
            "every key afresh"
        )
    if listed.get(node) == "unregistered":
        raise FedloraError(
            f"{key}: revoked earlier (node {node}), and Flower never admits a revoked key again; the "
            "institution makes a new key pair (`fedlora-client keys`) and sends its .pub"
        )
    say(f"admitted {key} (node {node}, registered before)")
    return node


def register_nodes(folder: RunFolder, keys: list[str], say: Say) -> None:
    """Make the SuperLink's persistent registry equal security.node_public_keys: admit each key,
    and unregister every other node, so that a key removed from the config is revoked."""
    known, listed = read_node_ids(folder), registered_nodes(folder)
    admitted = {_admit(folder, key, known, listed, say) for key in keys}
    for node, node_status in listed.items():
        if node in admitted or node_status == "unregistered":
            continue
        args = ("supernode", "unregister", str(node), CONNECTION)
        answer = flwr(folder, *args)
        if not answer.get("success"):
            raise _failed(args, answer)
        say(f"revoked node {node}: its key is no longer in security.node_public_keys")


def submit_run(folder: RunFolder, app: Path, config_path: Path) -> int:
    run_config = config_pairs({P.NODE_CONFIG: str(config_path.resolve()), P.RUN_DIR: str(folder.root)})
    args = ("run", str(app), CONNECTION, "--run-config", run_config)
    answer = flwr(folder, *args)
    if not answer.get("success"):
        raise _failed(args, answer)
    run_id = int(answer["run-id"])
    write_number(folder.run_id_file, run_id)
    return run_id


def run_status(folder: RunFolder, run_id: int) -> str:
    args = ("ls", CONNECTION, "--run-id", str(run_id))
    answer = flwr(folder, *args)
    if not answer.get("success") or not answer.get("runs"):
        raise _failed(args, answer)
    return str(answer["runs"][0]["status"])


def wait_until_listening(
    proc: subprocess.Popen, address: str, log: Path, what: str = "the SuperLink"
) -> None:
    host, port = split_address(reachable_address(address))
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedloraError(f"{what} exited with code {proc.returncode}: {last_line(log)}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise FedloraError(f"{what} did not listen on {address} within {READY_SECONDS:g} s; see {log}")


def last_line(log: Path, marker: str = "") -> str:
    """The last non-empty line of a log (containing ``marker``), without colours."""
    try:
        lines = [plain(line) for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return f"{log} is unreadable"
    found = [line for line in lines if line and marker in line]
    return found[-1] if found else f"nothing in {log}"


def history(folder: RunFolder) -> list[dict]:
    """The rounds completed so far ([] before the first); a checkpoint being replaced reads as []."""
    try:
        ckpt = load_checkpoint(folder.checkpoint)
    except CheckpointError:
        return []
    return [entry for entry in ckpt.history if entry.get("round")] if ckpt is not None else []


def follow(
    folder: RunFolder, run_id: int, serving: dict[str, subprocess.Popen], rounds: int, say: Say
) -> str:
    """Report rounds as the checkpoint gains them until the run finishes; its final status."""
    logs = start_child(
        [flower_program("flwr"), "log", str(run_id), CONNECTION, "--stream"],
        flower_env(folder.flwr_home),
        folder.serverapp_log,
    )
    pointer = folder.checkpoint / POINTER
    seen = max((e["round"] for e in history(folder)), default=0)
    stamp: int | None = None

    def report() -> None:
        nonlocal seen, stamp
        now_stamp = pointer.stat().st_mtime_ns if pointer.exists() else None
        if now_stamp == stamp:
            return
        entries = history(folder)
        if entries or now_stamp is None:  # else the checkpoint was being replaced: read it again
            stamp = now_stamp
        for entry in entries:
            if entry["round"] > seen:
                seen = entry["round"]
                say(summarise_round(entry).line(rounds))

    next_status = 0.0
    try:
        while True:
            report()
            for what, proc in serving.items():
                if proc.poll() is not None:
                    raise FedloraError(
                        f"{what} stopped (exit code {proc.returncode}) during run {run_id}; "
                        f"{seen} rounds are checkpointed: `fedlora-server start` again resumes"
                    )
            if logs.poll() is not None and time.monotonic() >= next_status:
                status = run_status(folder, run_id)
                if status.startswith("finished"):
                    report()
                    return status
                next_status = time.monotonic() + STATUS_POLL_SECONDS
            time.sleep(FOLLOW_POLL_SECONDS)
    finally:
        stop_child(logs, grace=5.0)


def start(cfg: FedloraConfig, config_path: Path, run_dir: Path, app: Path, insecure: bool, say: Say) -> None:
    """Serve one federation until its run finishes; FedloraError if it does not complete."""
    folder = RunFolder(run_dir.resolve())
    running = folder.superlink_pid()
    if running is not None:
        raise FedloraError(f"{run_dir}: its SuperLink is already running (pid {running}); stop it first")
    port = loopback_port(avoid=split_address(cfg.federation.superlink_address)[1])
    cmd, gate_cmd = superlink_command(cfg, folder, insecure, port), gate_command(cfg, insecure, port)
    keys = [] if insecure else admitted_keys(cfg)
    write_connection(cfg, folder, insecure, port)
    superlink = start_child(cmd, flower_env(folder.flwr_home), folder.superlink_log)
    write_number(folder.pid_file, superlink.pid)
    write_number(folder.supervisor_pid_file, os.getpid())
    gate = start_child(gate_cmd, flower_env(), folder.gate_log)
    try:
        with sigterm_as_interrupt():
            wait_until_listening(superlink, f"{LOOPBACK}:{port}", folder.superlink_log)
            wait_until_listening(gate, cfg.federation.superlink_address, folder.gate_log, "the Fleet gate")
            say(
                f"SuperLink listening on {cfg.federation.superlink_address} for SuperNodes only "
                f"(pid {superlink.pid}; its Control API on {LOOPBACK}:{port})"
            )
            register_nodes(folder, keys, say)
            run_id = submit_run(folder, app, config_path)
            say(f"run {run_id} submitted; ServerApp log: {folder.serverapp_log}")
            serving = {"the SuperLink": superlink, "the Fleet gate": gate}
            status = follow(folder, run_id, serving, cfg.federation.rounds, say)
    finally:
        stop_child(gate, grace=5.0)
        stop_child(superlink)
        folder.pid_file.unlink(missing_ok=True)
        folder.supervisor_pid_file.unlink(missing_ok=True)
    if status != COMPLETED:
        reason = last_line(folder.serverapp_log, "Error")
        raise FedloraError(f"run {run_id} ended {status}: {reason} (log: {folder.serverapp_log})")
    say(f"run {run_id} completed: adapter and history.json in {folder.root}")


def status(cfg: FedloraConfig, run_dir: Path) -> dict[str, str]:
    folder = RunFolder(run_dir.resolve())
    pid = folder.superlink_pid()
    done = history(folder)
    report = {
        "run folder": str(folder.root),
        "SuperLink": f"running (pid {pid})" if pid is not None else "not running",
        "rounds done": f"{len(done)} of {cfg.federation.rounds}",
        "adapter": str(folder.root / "adapter") if (folder.root / "adapter").is_dir() else "not yet",
    }
    if done:
        report["last round"] = summarise_round(done[-1]).line(cfg.federation.rounds)
    run_id = read_number(folder.run_id_file)
    if run_id is not None:
        report["run"] = str(run_id) if pid is None else f"{run_id}, {run_status(folder, run_id)}"
    return report


def stop(run_dir: Path, grace: float) -> int | None:
    """Stop the folder's SuperLink; its pid, None if none ran. Its `fedlora-server start` is asked
    first: it closes its log stream, without which the SuperLink would not stop gracefully."""
    folder = RunFolder(run_dir.resolve())
    pid = folder.superlink_pid()
    supervisor = folder.supervisor_pid()
    if supervisor is not None:
        interrupt_pid(supervisor, SUPERVISOR, grace + STOP_GRACE_SECONDS)
    if pid is not None:
        stop_pid(pid, SUPERLINK, grace)
    folder.pid_file.unlink(missing_ok=True)
    return pid
