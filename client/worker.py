"""The institution's long-lived worker: its base model, tokenizer and data stay loaded across rounds,
evaluations and runs.

The daemon (client.daemon) starts it beside the SuperNode; the per-message ClientApp (client.relay)
hands it each message over a private Unix socket. It runs fedlora's ClientApp (client.app) unchanged,
one message at a time: the ledger is re-read from disk for every message, and the audit and error logs
are written as before. Only read-only inputs stay cached, keyed on the institution's config; when its
data files or a local model folder change on disk, what depends on them is dropped and loaded again.

    python -m fedlora.client.worker FOLDER [--parent-pid PID]

With --parent-pid it exits when that process (its daemon) is gone, and removes the folder with its key.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from pathlib import Path

from flwr.app import Context

from fedlora.client.app import app, forget_shared_data
from fedlora.client.relay import read_key, socket_path
from fedlora.common import protocol as P
from fedlora.common.config import FedloraConfig, load_config
from fedlora.common.errors import FedloraError
from fedlora.common.model import BUILTIN_SOURCES, forget_base_models

log = logging.getLogger("fedlora.worker")
PARENT_POLL_SECONDS = 0.2

Stamp = tuple[tuple[str, int, int], ...]


def data_files(cfg: FedloraConfig) -> list[Path]:
    return [Path(p) for p in (cfg.data.path, cfg.data.eval_path) if p]


def model_files(cfg: FedloraConfig) -> list[Path]:
    """A local model folder's files (the built-in models ship in installed packages)."""
    if cfg.model.source in BUILTIN_SOURCES:
        return []
    folder = Path(cfg.model.source).expanduser()
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def stamp(files: list[Path]) -> Stamp:
    """Name, modification time and size of each file (-1 for one that is missing)."""
    out = []
    for path in files:
        try:
            st = path.stat()
            out.append((str(path), st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((str(path), -1, -1))
    return tuple(out)


class Freshness:
    """Drops the cached data, or base model, when the files behind them change between messages."""

    def __init__(self) -> None:
        self.data: Stamp | None = None
        self.model: Stamp | None = None

    def check(self, context: Context) -> None:
        try:
            cfg = load_config(str(context.node_config.get(P.NODE_CONFIG, "")), persona="institution")
        except FedloraError:
            return  # the ClientApp reports it, as without a worker
        data, model = stamp(data_files(cfg)), stamp(model_files(cfg))
        if self.data is not None and data != self.data:
            log.info("data files changed on disk; dropping the loaded tokenizer and data")
            forget_shared_data()
        if self.model is not None and model != self.model:
            log.info("model folder changed on disk; dropping the loaded base model")
            forget_base_models()
            forget_shared_data()  # the tokenizer lives in the same folder
        self.data, self.model = data, model


def handle(conn: Connection, fresh: Freshness) -> None:
    """One message: received, handled by the ClientApp, its reply and the context's state sent back."""
    msg, context = conn.recv()
    fresh.check(context)
    reply = app(msg, context)
    conn.send((reply, context.state))


def serve(folder: Path) -> None:
    """Answer the relay until stopped (SIGTERM, or its parent's exit)."""
    address = socket_path(folder)
    Path(address).unlink(missing_ok=True)  # left by a worker that was killed
    fresh = Freshness()
    with Listener(address, family="AF_UNIX", authkey=read_key(folder)) as listener:
        os.chmod(address, 0o600)
        log.info("worker %d listening on %s", os.getpid(), address)
        while True:
            try:
                conn = listener.accept()
            except (AuthenticationError, OSError, EOFError) as err:  # a wrong key, or a client gone
                log.warning("refused a connection: %s", err)
                continue
            with conn:
                try:
                    handle(conn, fresh)
                except Exception:
                    log.exception("the message could not be handled; the relay reports it")


def leave_with(parent_pid: int, folder: Path) -> None:
    """Once ``parent_pid`` (the daemon) is no longer this process's parent, however it ended (SIGKILL
    included), remove the folder with its key and socket, which nobody else will, and exit at once.
    A thread of its own: the main thread may be blocked in accept() or busy with a message, and
    Flower's parent monitor (a SIGINT only that thread sees) does not reach it there."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        shutil.rmtree(folder, ignore_errors=True)
        os._exit(0)  # nothing to report to: the daemon held this process's output

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fedlora.client.worker", description=__doc__)
    ap.add_argument("folder", type=Path, help="the worker folder its daemon prepared (client.relay)")
    ap.add_argument(
        "--parent-pid", type=int, help="exit, removing FOLDER, when this process (the daemon) is gone"
    )
    args = ap.parse_args(argv)
    # force: a library imported above already put a WARNING handler on the root logger
    logging.basicConfig(
        level=logging.INFO, format="fedlora-worker %(levelname)s %(name)s: %(message)s", force=True
    )
    if args.parent_pid is not None:
        leave_with(args.parent_pid, args.folder)
    try:
        serve(args.folder)
    except KeyboardInterrupt:
        log.info("worker stopped")


if __name__ == "__main__":
    main()
