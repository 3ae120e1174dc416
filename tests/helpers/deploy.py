"""Real processes for the deployment tests: a small federation on 127.0.0.1, and a tracker that
kills everything a test started, even on failure.

Flower starts its SuperExec, ServerApp and ClientApps in sessions of their own, so killing process
groups is not enough. Every process a test starts carries a tag in its environment, inherited by all
its descendants; the tracker finds them by that tag in /proc and kills them.
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fedlora.client import cli as client_cli
from fedlora.common.config import PERSONAS
from fedlora.common.devcerts import make_dev_certs

TAG = "FEDLORA_TEST_PROCESS"
LABELS = ("neg", "pos")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str, logs: Callable[[], str] = str) -> None:
    """Poll ``check`` until true; fail with ``what`` and the logs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout:g} s\n{logs()}")


class Processes:
    """Processes of one test, by role ("server", "a", ...), each with its log file."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.session = uuid.uuid4().hex
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, role: str, args: list[str]) -> subprocess.Popen:
        env = {**self.env, TAG: f"{self.session}:{role}"}
        with self.log_path(role).open("a") as out:
            proc = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs[role] = proc
        return proc

    def log_path(self, role: str) -> Path:
        return self.folder / f"{role}.log"

    def log(self, role: str) -> str:
        path = self.log_path(role)
        return path.read_text(errors="replace") if path.exists() else ""

    def tails(self, lines: int = 25) -> str:
        return "\n".join(
            f"--- {role} ---\n" + "\n".join(self.log(role).splitlines()[-lines:]) for role in self.procs
        )

    def wait_log(self, role: str, text: str, timeout: float) -> None:
        wait_for(lambda: text in self.log(role), timeout, f"{role} logging {text!r}", self.tails)

    def wait(self, role: str, timeout: float) -> int:
        """The role's exit code; fails the test if it is still running after ``timeout`` seconds."""
        try:
            return self.procs[role].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{role}: still running after {timeout:g} s\n{self.tails()}")

    def terminate(self, role: str, timeout: float) -> int:
        """SIGTERM to the role's own process only, as a service manager would send it."""
        self.procs[role].send_signal(signal.SIGTERM)
        return self.wait(role, timeout)

    def _tagged(self, role: str | None) -> list[int]:
        """Pids whose environment carries this session's tag (for ``role``, or any role)."""
        exact = f"{TAG}={self.session}:{role}".encode()
        prefix = f"{TAG}={self.session}:".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(v == exact if role else v.startswith(prefix) for v in environ):
                pids.append(int(entry.name))
        return pids

    def alive(self, role: str) -> list[str]:
        """Command lines of the role's processes still running (descendants included; not zombies,
        whose environment can no longer be read)."""
        lines = []
        for pid in self._tagged(role):
            with contextlib.suppress(OSError):
                lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        return lines

    def children(self, role: str, parent: int) -> list[str]:
        """Command lines of the role's running processes whose parent is ``parent``."""
        lines = []
        for pid in self._tagged(role):
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        return lines

    def kill(self, role: str | None = None) -> None:
        """SIGKILL the role (every role when None) and all its descendants, then reap."""
        for _ in range(3):  # a dying parent may still be starting a child
            for pid in self._tagged(role):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        for name, proc in self.procs.items():
            if role is None or name == role:
                proc.wait(timeout=10)


@dataclass(frozen=True)
class Federation:
    """Files of a federation on one machine: certificates, keys, data, YAMLs."""

    root: Path
    server_yaml: Path
    institutions: dict[str, Path]

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def ledger(self, name: str) -> Path:
        return self.root / name / "ledger.json"

    def server_cmd(self) -> list[str]:
        return [sys.executable, "-m", "fedlora.server.cli", "start", str(self.server_yaml)]

    def client_cmd(self, name: str, *extra: str) -> list[str]:
        config = str(self.institutions[name])
        return [sys.executable, "-m", "fedlora.client.cli", "start", config, "--grace", "10", *extra]


def write_csv(path: Path, rows: int, seed: int) -> None:
    words = {"neg": "bad awful poor sad", "pos": "good great fine glad"}
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        for i in range(rows):
            label = LABELS[(i + seed) % 2]
            out.writerow([f"{words[label]} item {i}", label])


def make_federation(
    root: Path,
    federation: dict,
    institutions: tuple[str, ...] = ("a", "b"),
    admitted: tuple[str, ...] = ("a", "b"),
) -> Federation:
    """Dev certificates, a key pair per institution, their data and YAMLs, and the coordinator's YAML
    admitting only ``admitted``; every party points at one free port."""
    certs = make_dev_certs(root / "certs")
    federation = {"superlink_address": f"127.0.0.1:{free_port()}", "fraction_evaluate": 0, **federation}
    own = PERSONAS["institution"].keys
    common = {"model": {"source": "tiny-bert"}}
    paths = {}
    for i, name in enumerate(institutions):
        folder = root / name
        folder.mkdir()
        write_csv(folder / "data.csv", 40, seed=i)
        config = {
            **common,
            "training": {"local_steps": 2, "batch_size": 8, "device": "cpu"},
            "federation": {k: v for k, v in federation.items() if f"federation.{k}" in own},
            "name": f"institution-{name}",
            "data": {"path": "data.csv", "labels": list(LABELS), "max_length": 32},
            "privacy": {"epsilon": 8, "ledger_path": "ledger.json"},
            "security": {"ca_cert": str(certs.ca_cert), "node_private_key": "node.key"},
        }
        paths[name] = folder / "institution.yaml"
        paths[name].write_text(yaml.safe_dump(config))
        assert client_cli.main(["keys", str(paths[name])]) == 0
    server = {
        **common,
        "training": {"device": "cpu"},
        "federation": federation,
        "name": "coordinator",
        "data": {"labels": list(LABELS), "max_length": 32},
        "security": {
            "ca_cert": str(certs.ca_cert),
            "server_cert": str(certs.server_cert),
            "server_key": str(certs.server_key),
            "node_public_keys": [str(root / name / "node.key.pub") for name in admitted],
        },
    }
    server_yaml = root / "coordinator.yaml"
    server_yaml.write_text(yaml.safe_dump(server))
    return Federation(root, server_yaml, paths)


def process_env(root: Path) -> dict[str, str]:
    """Offline, one torch thread per process (two cores shared by many), a private FLWR_HOME."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "FLWR_HOME": str(root / "flwr-home"),
    }
