"""The institution's ``flwr-clientapp``: every message runs fedlora's own installed ClientApp, never the
code of the app bundle (FAB) that a run submitted.

Flower's SuperNode runs, for every message, the ClientApp of whatever app the SuperLink's run names:
its ``flwr-clientapp`` installs the run's FAB under the Flower home and imports the ClientApp from it.
Whoever can start a run on the coordinator's SuperLink would run their code, as the institution, next
to its YAML, data and ledger. Flower's own guard, ``flower-supernode --trusted-entities``, accepts only
FABs signed through Flower Hub: a FAB submitted with ``flwr run DIR`` carries no verification and is
refused, fedlora's own included, so it cannot serve an offline federation.

So the daemon (client.daemon) starts the SuperNode with ``--isolation process`` (it launches no
program itself) and, beside it, Flower's SuperExec from this module (`superexec_command`), whose one
program is this module's ``flwr-clientapp``, named by its full path (a PATH lookup could be reordered,
by a pyenv shim for one). That program is Flower's own runner (task pull, heartbeat, reply, exit codes)
with two steps replaced: the FAB is never installed nor imported, and its pyproject must name fedlora's
publisher and components (`check_app`), else the message fails before anything is read; the ClientApp
that handles the message is ``fedlora.client.relay.app`` from this installation.

    python -P -m fedlora.client.own_app superexec PROGRAM ...   (Flower's flower-superexec arguments)
    python -P -m fedlora.client.own_app ...                     (Flower's flwr-clientapp arguments)
"""

from __future__ import annotations

import importlib
import logging
import os
import shlex
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flwr.supernode.runtime.run_clientapp as flower_runner
from flwr.clientapp import ClientApp
from flwr.common.config import get_fab_config
from flwr.common.logger import LOGGER_NAME
from flwr.supercore.cli.flower_superexec import flower_superexec
from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

from fedlora.common import protocol as P
from fedlora.common.errors import FedloraError

PROGRAM = "flwr-clientapp"
NO_INSTALL = "--allow-runtime-dependency-installation"
SUPEREXEC = "superexec"


class ForeignApp(FedloraError):
    """A run's app bundle is not fedlora's: the institution does not take part in it."""


def check_app(fab_content: bytes, skip_prompt: bool = True) -> None:
    """Stands in for Flower's ``install_from_fab``: installs nothing, refuses a FAB that is not
    fedlora's (by its declared publisher and components; the code that runs is ours either way)."""
    del skip_prompt
    try:
        app = get_fab_config(fab_content)["tool"]["flwr"]["app"]
    except (ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        raise ForeignApp(f"the run's app bundle is not a valid Flower App ({err}); refused") from None
    publisher, components = app.get("publisher"), dict(app.get("components", {}))
    if publisher != P.APP_PUBLISHER or components != P.APP_COMPONENTS:
        raise ForeignApp(
            f"the run's app is not fedlora's (publisher {publisher!r}, components {components}); "
            "this institution runs only fedlora's own ClientApp"
        )


class OneLineRefusal(logging.Filter):
    """Flower logs a ClientApp's exception with its traceback; a refused app is one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        refused = record.exc_info[1] if record.exc_info else None
        if isinstance(refused, ForeignApp):
            record.msg, record.args, record.exc_info = f"refused: {refused}", (), None
        return True


def load_own_app(**_flower_options: Any) -> Callable[[str, str, str], ClientApp]:
    """Stands in for Flower's ``get_load_client_app_fn``: whatever the run, fedlora's installed relay."""

    def load(_fab_id: str, _fab_version: str, _fab_hash: str) -> ClientApp:
        return importlib.import_module("fedlora.client.relay").app

    return load


def write_program(folder: Path) -> Path:
    """``folder/bin/flwr-clientapp``: this module's runner, with this Python (no PATH lookup)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(mode=0o700, exist_ok=True)
    program = bin_dir / PROGRAM
    # -P: the working directory (the SuperNode's) never shadows an installed module
    program.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -P -m {__name__} \"$@\"\n")
    program.chmod(0o700)
    return program


def superexec_command(folder: Path, runtime_port: int) -> list[str]:
    """Flower's SuperExec for a SuperNode started with ``--isolation process`` on ``runtime_port``:
    it launches ``folder``'s flwr-clientapp (`write_program`) for every message, and nothing else."""
    program = write_program(folder)
    runtime = f"127.0.0.1:{runtime_port}"
    return [
        *(sys.executable, "-P", "-m", __name__, SUPEREXEC, str(program)),
        *("--runtime-api-address", runtime, "--insecure", "--parent-pid", str(os.getpid())),
    ]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == SUPEREXEC:
        TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = sys.argv[2]
        sys.argv = ["flower-superexec", *sys.argv[3:]]
        flower_superexec()
        return
    if not hasattr(flower_runner, "install_from_fab") or not hasattr(flower_runner, "get_load_client_app_fn"):
        raise SystemExit(f"{PROGRAM}: this Flower's runner cannot be pinned to fedlora's ClientApp; refusing")
    flower_runner.install_from_fab = check_app
    logging.getLogger(LOGGER_NAME).addFilter(OneLineRefusal())
    flower_runner.get_load_client_app_fn = load_own_app
    sys.argv = [PROGRAM, *(arg for arg in sys.argv[1:] if arg != NO_INSTALL)]
    flwr_clientapp()


if __name__ == "__main__":
    main()
