"""The institution's daemon, ``fedlora-client start``, and what it starts (issue 26): a SIGKILLed daemon
takes its SuperNode, SuperExec and worker along and its worker folder (with the key) goes; it runs
without its environment's scripts folder on PATH; a TMPDIR too long for a Unix socket neither
crash-loops the worker nor starts anything it cannot finish.

Real processes: no SuperLink is needed; the daemon starts its own SuperExec (client.own_app) beside
the worker, and an insecure SuperNode keeps trying to reach the coordinator's address (a free port
here)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedlora.client import daemon
from fedlora.common.errors import ConfigError
from fedlora.common.launch import flower_env
from helpers.deploy import Processes, free_port, make_federation, wait_for

LISTENING = re.compile(r"listening on (\S+)/socket")
OWN_SUPEREXEC = "fedlora.client.own_app superexec"  # the daemon's SuperExec (not the SuperNode's)
STARTUP_SECONDS = 120  # the worker imports torch and loads tiny-bert on a shared, loaded machine


def start_daemon(tmp_path: Path, processes: Processes, **env: str) -> Path:
    """``fedlora-client start --insecure`` for one institution; its worker folder once it listens."""
    fed = make_federation(tmp_path, {}, institutions=("a",), admitted=("a",))
    processes.env = {**processes.env, **env}
    processes.start("a", fed.client_cmd("a", "--insecure", "--runtime-port", str(free_port())))
    processes.wait_log("a", "listening on", STARTUP_SECONDS)
    daemon_pid = processes.procs["a"].pid
    wait_for(
        lambda: (
            any(OWN_SUPEREXEC in line for line in processes.children("a", daemon_pid))
            and any("flower-supernode" in line for line in processes.children("a", daemon_pid))
        ),
        STARTUP_SECONDS,
        "the daemon starting its SuperNode and its own SuperExec",
        processes.tails,
    )
    return Path(LISTENING.search(processes.log("a")).group(1))


@pytest.mark.integration
def test_a_killed_daemon_takes_its_processes_and_worker_folder_along(tmp_path, processes) -> None:
    folder = start_daemon(tmp_path, processes)
    alive = processes.alive("a")
    assert folder.is_dir() and any("flower-supernode" in line for line in alive)
    assert any(OWN_SUPEREXEC in line for line in alive)
    assert any("fedlora.client.worker" in line for line in alive)

    processes.procs["a"].send_signal(signal.SIGKILL)  # the daemon only, as the OOM killer would
    processes.wait("a", 10)

    wait_for(
        lambda: not processes.alive("a") and not folder.exists(),
        30,
        f"SuperNode, SuperExec and worker gone and {folder} removed (left: {processes.alive('a')})",
        processes.tails,
    )


@pytest.mark.integration
def test_the_daemon_runs_without_its_scripts_folder_on_path(tmp_path, processes) -> None:
    # As a service manager whose PATH misses the environment: only flower-supernode can be found (a
    # link to flwr's own script, not a pyenv shim that fixes PATH itself). Before the fix the
    # SuperNode found no flower-superexec and lived on with a traceback; now the daemon starts its
    # SuperExec with its own interpreter and the runner by full path, and neither may fail.
    flwr = importlib.metadata.distribution("flwr")
    [script] = [flwr.locate_file(f) for f in flwr.files if f.name == "flower-supernode"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "flower-supernode").symlink_to(script)
    start_daemon(tmp_path, processes, PATH=f"{bin_dir}:/usr/bin:/bin")
    time.sleep(3)  # a SuperExec or SuperNode that cannot start its programs fails within this
    alive = processes.alive("a")
    assert any(OWN_SUPEREXEC in line for line in alive) and any("flower-supernode" in line for line in alive)
    assert "Traceback" not in processes.log("a")
    assert processes.terminate("a", 60) == 0


@pytest.mark.integration
def test_a_tmpdir_too_long_for_a_socket_gets_a_short_worker_folder(tmp_path, processes) -> None:
    long_tmp = tmp_path / ("t" * (150 - len(str(tmp_path)) - 1))
    long_tmp.mkdir()
    assert len(str(long_tmp)) == 150
    folder = start_daemon(tmp_path, processes, TMPDIR=str(long_tmp))
    assert len(os.fsencode(folder / "socket")) <= daemon.MAX_SOCKET_PATH
    assert not folder.is_relative_to(long_tmp) and "Traceback" not in processes.log("a")
    assert processes.terminate("a", 60) == 0
    assert not folder.exists()


def test_the_worker_folder_falls_back_to_tmp_or_is_refused_in_one_line(tmp_path, monkeypatch) -> None:
    long_tmp = tmp_path / ("t" * 120)
    long_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    assert daemon.worker_parent() == daemon.SHORT_TEMP
    monkeypatch.setattr(daemon, "SHORT_TEMP", str(long_tmp))
    with pytest.raises(ConfigError, match=r"^TMPDIR: .*t{120} is too long for the worker's Unix socket"):
        daemon.worker_parent()


def test_flower_children_find_flowers_programs_without_them_on_path(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    path = flower_env()["PATH"]
    assert path.split(os.pathsep)[0] == str(Path(sys.executable).parent)
    for program in ("flower-supernode", *daemon.SUPERNODE_PROGRAMS):
        assert shutil.which(program, path=path), program
