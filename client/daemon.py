"""The institution's SuperNode: TLS, the node's authentication key, and its own YAML as node config;
beside it, the institution's worker, which keeps the base model loaded (client.worker), and the
SuperExec that runs only fedlora's own ClientApp for its messages (client.own_app).

Only the institution's YAML decides the data, the budget, the ledger and the device: the ClientApp
reads it from the node config, which the coordinator cannot change. The SuperNode and the worker run
as children and are stopped within a bound when this process gets SIGTERM or Ctrl-C; a worker that
dies is started again.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fedlora.client.own_app import superexec_command
from fedlora.client.relay import SOCKET, open_folder
from fedlora.common import protocol as P
from fedlora.common.config import FedloraConfig
from fedlora.common.errors import ConfigError, FedloraError
from fedlora.common.launch import (
    POLL_SECONDS,
    config_pairs,
    flower_env,
    flower_program,
    plain,
    sigterm_as_interrupt,
    start_child,
    stop_child,
)

RUNTIME_PORT = 9094
ACTIVATION_PATIENCE = 90.0  # Flower: online until 2 heartbeats (2 x 30 s) are missed, plus a margin
RETRY_SECONDS = 10.0
ACTIVATION_REFUSED = "[code: 2004]"  # Flower's FLEET_NODE_ACTIVATION_FAILED
# What the SuperNode starts by bare name (found through the PATH that flower_env gives it).
SUPERNODE_PROGRAMS = ("flower-superexec", "flwr-clientapp")
WORKER_PREFIX = "fedlora-worker-"
MAX_SOCKET_PATH = 107  # bytes: Linux's sun_path holds 108 with the final NUL (macOS: 104)
SHORT_TEMP = "/tmp"


@dataclass(frozen=True)
class SuperNodeOptions:
    insecure: bool = False
    runtime_port: int = RUNTIME_PORT
    max_wait_time: float | None = None


def _existing(path: str | None, key: str, hint: str) -> str:
    if not path:
        raise ConfigError(f"{key}: not set; {hint}")
    if not Path(path).is_file():
        raise ConfigError(f"{key}: {path} does not exist; {hint}")
    return path


def supernode_command(
    cfg: FedloraConfig, config_path: Path, options: SuperNodeOptions, worker: Path | None = None
) -> list[str]:
    """The flower-supernode command line for this institution; its ClientApp hands every message to
    the ``worker`` folder's worker (None: each message is handled, and the model loaded, on its own).
    With a worker, the SuperNode launches no app itself: `own_superexec` runs fedlora's (client.own_app)."""
    if cfg.data.path is not None and not Path(cfg.data.path).is_file():
        raise ConfigError(f"data.path: {cfg.data.path} does not exist")
    cmd = [
        flower_program("flower-supernode"),
        "--superlink",
        cfg.federation.superlink_address,
        "--host",
        "127.0.0.1",
        "--port",
        str(options.runtime_port),
        "--node-config",
        config_pairs(
            {P.NODE_CONFIG: str(config_path.resolve())} | ({P.NODE_WORKER: str(worker)} if worker else {})
        ),
    ]
    if worker:
        cmd += ["--isolation", "process"]
    if options.insecure:
        cmd.append("--insecure")
    else:
        sec = cfg.security
        ca = _existing(sec.ca_cert, "security.ca_cert", "the coordinator's CA certificate is needed for TLS")
        key = _existing(
            sec.node_private_key, "security.node_private_key", "create it with `fedlora-client keys CONFIG`"
        )
        cmd += ["--root-certificates", ca, "--auth-supernode-private-key", key]
    if options.max_wait_time is not None:
        cmd += ["--max-wait-time", f"{options.max_wait_time:g}"]
    return cmd


def exit_reason(lines: Iterable[str]) -> str:
    """Flower's explanation of why a SuperNode stopped: what follows its last 'Exit Code: N'."""
    clean = [plain(line) for line in lines]
    starts = [i for i, line in enumerate(clean) if "Exit Code:" in line]
    if not starts:
        said = [line for line in clean if line]
        return said[-1] if said else "no output"
    code = clean[starts[-1]].split("Exit Code:", 1)[1].strip()
    explanation = []
    for line in clean[starts[-1] + 1 :]:
        if not line or line.startswith("For more information"):
            break
        explanation.append(" ".join(line.rstrip(".").split()))
    return f"{'; '.join(explanation) or 'no explanation given'} (Flower exit code {code})"


def _echo(stream: IO[str], tail: deque[str]) -> None:
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line)


def _lifetime(cmd: list[str], grace: float) -> tuple[int, deque[str]]:
    """One SuperNode, echoed, until it exits (then what it left behind is stopped too); its exit code
    and last lines."""
    proc = start_child(cmd, flower_env(), death_signal=signal.SIGTERM)  # gone when this process is killed
    tail: deque[str] = deque(maxlen=400)  # room for the SuperExec's traceback after the exit code
    reader = threading.Thread(target=_echo, args=(proc.stdout, tail), daemon=True)
    reader.start()
    try:
        return proc.wait(), tail
    finally:
        stop_child(proc, grace)
        reader.join(timeout=grace)


def run_supernode(cmd: list[str], grace: float, patience: float) -> None:
    """Run the SuperNode until it exits or this process is told to stop.

    After a crash the SuperLink still counts the node online for two heartbeats (about a minute) and
    refuses to activate it again meanwhile, exactly as it refuses an unregistered key: such refusals
    are retried for ``patience`` seconds, so a restart right after a crash rejoins.
    """
    give_up = time.monotonic() + patience
    try:
        with sigterm_as_interrupt():
            while True:
                code, tail = _lifetime(cmd, grace)
                if code == 0:
                    return
                reason = exit_reason(tail)
                if ACTIVATION_REFUSED not in reason or time.monotonic() + RETRY_SECONDS > give_up:
                    break
                sys.stdout.write(f"fedlora: SuperNode not activated; retrying in {RETRY_SECONDS:g} s\n")
                time.sleep(RETRY_SECONDS)
    except KeyboardInterrupt:
        return
    if ACTIVATION_REFUSED in reason:
        reason += "; is this node's public key registered with the coordinator?"
    raise FedloraError(f"flower-supernode stopped: {reason}")


def worker_command(folder: Path) -> list[str]:
    return [sys.executable, "-m", "fedlora.client.worker", str(folder), "--parent-pid", str(os.getpid())]


def _supervise(folder: Path, grace: float, stop: threading.Event) -> None:
    """The worker, echoed, started again when it dies (the relay reports the message it held as an
    internal error), and stopped once ``stop`` is set."""
    while True:
        proc = start_child(worker_command(folder), flower_env())
        threading.Thread(target=_echo, args=(proc.stdout, deque(maxlen=0)), daemon=True).start()
        while proc.poll() is None and not stop.wait(POLL_SECONDS):
            pass
        if stop.is_set():
            stop_child(proc, grace)
            return
        sys.stdout.write(f"fedlora: worker exited with code {proc.returncode}; starting it again\n")
        if stop.wait(RETRY_SECONDS):
            return


def _socket_fits(parent: str) -> bool:
    """Whether a worker folder made in ``parent`` (mkdtemp adds 8 characters) holds a Unix socket."""
    return len(os.fsencode(os.path.join(parent, WORKER_PREFIX + "x" * 8, SOCKET))) <= MAX_SOCKET_PATH


def worker_parent() -> str:
    """The temporary folder for worker folders: the usual one (TMPDIR), else /tmp when TMPDIR is too
    long for the worker's socket path; refused in one line, before anything starts, when neither fits."""
    usual = tempfile.gettempdir()
    for parent in (usual, SHORT_TEMP):
        if _socket_fits(parent) and os.access(parent, os.W_OK | os.X_OK):
            return parent
    raise ConfigError(
        f"TMPDIR: {usual} is too long for the worker's Unix socket (a path of at most {MAX_SOCKET_PATH} "
        f"bytes) and {SHORT_TEMP} is not writable; expected TMPDIR set to a short writable folder"
    )


@contextmanager
def own_superexec(folder: Path, runtime_port: int, grace: float) -> Iterator[None]:
    """Flower's SuperExec for the SuperNode, echoed, for as long as the block runs: it launches
    fedlora's own ClientApp runner from ``folder`` (client.own_app), never a run's app bundle."""
    proc = start_child(superexec_command(folder, runtime_port), flower_env(), death_signal=signal.SIGTERM)
    threading.Thread(target=_echo, args=(proc.stdout, deque(maxlen=0)), daemon=True).start()
    try:
        yield
    finally:
        stop_child(proc, grace)


@contextmanager
def worker_running(grace: float) -> Iterator[Path]:
    """A worker in a new private folder (client.relay) for as long as the block runs; the folder it
    yields goes into the SuperNode's node config. If this process is killed, the worker removes it."""
    folder = Path(tempfile.mkdtemp(prefix=WORKER_PREFIX, dir=worker_parent()))
    open_folder(folder)
    stop = threading.Event()
    supervisor = threading.Thread(target=_supervise, args=(folder, grace, stop), daemon=True)
    supervisor.start()
    try:
        yield folder
    finally:
        stop.set()
        supervisor.join(timeout=grace + 5)
        shutil.rmtree(folder, ignore_errors=True)
