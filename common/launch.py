"""Running Flower's own programs (SuperLink, SuperNode, ``flwr``) as child processes.

Every child starts in its own session, so a signal meant for fedlora does not hit it twice, and every
stop is bounded: SIGTERM to the child's process group, then SIGKILL after a grace period. A process
that a later command must find (``fedlora-server stop``) is named by a pid file.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

from fedlora.common.durable import write_durably
from fedlora.common.errors import FedloraError

STOP_GRACE_SECONDS = 20.0
POLL_SECONDS = 0.2
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plain(line: str) -> str:
    """A line of Flower's coloured log output, without the colours."""
    return _ANSI.sub("", line).strip()


def flower_folders() -> list[str]:
    """Where this Python's Flower programs are: beside the interpreter (a virtual environment), then
    where the imported flwr installed its scripts (a venv over system site packages, a user install).
    Flower starts its own helpers by bare name (the SuperNode its ``flower-superexec``, that one each
    ``flwr-clientapp``), so these lead the PATH of every Flower child."""
    folders = [str(Path(sys.executable).parent)]
    with suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("flwr")
        folders += [str(dist.locate_file(f).resolve().parent) for f in dist.files or () if f.name == "flwr"]
    return list(dict.fromkeys(folders))


def flower_path() -> str:
    """The PATH of a Flower child: `flower_folders` first, then this process's PATH."""
    return os.pathsep.join([*flower_folders(), os.environ.get("PATH", os.defpath)])


def flower_program(name: str) -> str:
    """A Flower executable from this Python's environment (the same flwr as fedlora's), else PATH."""
    found = shutil.which(name, path=flower_path())
    if found is None:
        raise FedloraError(
            f"{name}: not found beside {sys.executable}, in flwr's scripts folder nor on PATH; "
            "is flwr installed in this environment?"
        )
    return found


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """The environment of a Flower child: this Python's Flower programs first on PATH; never install app
    dependencies at run time; Transformers' advice and loading bars (our apps load only local models)
    off unless the caller chose otherwise."""
    env = {"TRANSFORMERS_VERBOSITY": "error", **os.environ}
    env["PATH"] = flower_path()
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def config_pairs(values: Mapping[str, str]) -> str:
    """``k='v' ...`` for Flower's --run-config / --node-config: TOML literal strings, no escaping."""
    for key, value in values.items():
        if "'" in value or "\n" in value:
            raise FedloraError(f"{key}: {value!r} contains a quote or newline, which Flower can't carry")
    return " ".join(f"{key}='{value}'" for key, value in values.items())


def _die_with(parent: int, sig: signal.Signals) -> Callable[[], None]:
    """A child's preexec: the kernel sends it ``sig`` when the thread that started it ends, which a
    SIGKILL of this process does too (Linux PR_SET_PDEATHSIG); a parent that died before the prctl
    took effect is caught by the pid check. The libc call is looked up here, before the fork."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def start_child(
    cmd: list[str],
    env: Mapping[str, str],
    log: Path | None = None,
    death_signal: signal.Signals | None = None,
) -> subprocess.Popen:
    """Start ``cmd`` in a new session; its output goes to ``log`` (appended) or is piped as text. With
    ``death_signal`` (Linux) the child gets that signal when the calling thread or this process ends,
    however it ends: call it from a thread that outlives the child."""
    preexec = _die_with(os.getpid(), death_signal) if death_signal and sys.platform == "linux" else None
    if log is None:
        return subprocess.Popen(
            cmd,
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=preexec,
        )
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec
        )


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_group(pgid: int, grace: float, reap: Callable[[], object]) -> None:
    """SIGTERM the whole process group, wait up to ``grace`` for it to empty, then SIGKILL what is left.
    The group, not only its leader: Flower's SuperExec can outlive the SuperNode that started it."""
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap()
        if not _group_alive(pgid):
            return
        time.sleep(POLL_SECONDS)
    _signal_group(pgid, signal.SIGKILL)


def stop_child(proc: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> int:
    """Stop a child started by `start_child` and everything it started in its group; its exit code."""
    _stop_group(proc.pid, grace, proc.poll)
    return proc.wait()


def pid_alive(pid: int, program: str) -> bool:
    """Whether ``pid`` is still ``program`` (a pid file may outlive its process, and pids get reused)."""
    if Path("/proc").is_dir():
        try:
            return program in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, program: str, grace: float = STOP_GRACE_SECONDS) -> None:
    """`stop_child` for a process started by another command: found by pid, checked to be ``program``."""
    if pid_alive(pid, program):
        _stop_group(pid, grace, lambda: None)


def interrupt_pid(pid: int, program: str, timeout: float) -> None:
    """SIGTERM one process (not its group, which may be a shell's) and wait up to ``timeout`` for it
    to finish stopping what it supervises."""
    if not pid_alive(pid, program):
        return
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid, program):
        time.sleep(POLL_SECONDS)


def write_number(path: Path, number: int) -> None:
    """A pid or run id file, for a later command to find."""
    write_durably(path, f"{number}\n".encode())


def read_number(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, so a supervisor stops its children as it does on Ctrl-C."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
