"""The ClientApp Flower runs for every message in deployment: it hands the message to the
institution's worker (client.worker), which keeps the base model loaded, and returns its reply.

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message, in both isolation modes (the
SuperExec launches one per task; it handles one message and exits), so a model loaded there is gone
by the next message. This module stays light (Flower and the standard library: no torch) because it
is imported once per message. The channel is a Unix socket in a folder only this user can open,
authenticated by a key file in it (multiprocessing.connection's HMAC handshake): only the
institution's own processes can hand the worker a message.

A node config without a worker (a SuperNode started by hand) keeps the old behaviour: the message is
handled here, loading the model for this one message.
"""

from __future__ import annotations

import importlib
import secrets
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from pathlib import Path
from types import ModuleType

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.common import protocol as P
from fedlora.common.errors import FedloraError

SOCKET = "socket"
KEY = "key"
PATIENCE_SECONDS = 120.0  # a (re)started worker imports torch and listens within this
RETRY_SECONDS = 0.5


class WorkerUnavailable(FedloraError):
    """The institution's worker could not be reached or stopped while handling a message."""


def open_folder(folder: Path) -> None:
    """A new worker folder: private to this user, with a fresh key."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    key = folder / KEY
    key.write_bytes(b"")
    key.chmod(0o600)
    key.write_bytes(secrets.token_bytes(32))


def socket_path(folder: Path) -> str:
    return str(folder / SOCKET)


def read_key(folder: Path) -> bytes:
    try:
        return (folder / KEY).read_bytes()
    except OSError as err:
        raise WorkerUnavailable(f"{folder / KEY}: cannot read the worker's key: {err.strerror}") from None


def _connect(folder: Path, patience: float) -> Connection:
    deadline = time.monotonic() + patience
    while True:
        try:
            return Client(socket_path(folder), family="AF_UNIX", authkey=read_key(folder))
        except (FileNotFoundError, ConnectionRefusedError) as err:
            if time.monotonic() > deadline:
                raise WorkerUnavailable(
                    f"{socket_path(folder)}: no worker listening after {patience:g} s ({err.strerror})"
                ) from None
            time.sleep(RETRY_SECONDS)


def ask(folder: Path, msg: Message, context: Context, patience: float = PATIENCE_SECONDS) -> Message:
    """The worker's reply to ``msg``; ``context`` takes the state the worker left in it."""
    try:
        with _connect(folder, patience) as conn:
            conn.send((msg, context))
            reply, state = conn.recv()
    except (EOFError, ConnectionError, AuthenticationError) as err:
        raise WorkerUnavailable(
            f"the worker refused or dropped a {msg.metadata.message_type} message: {type(err).__name__}"
        ) from None
    context.state = state
    return reply


def _here() -> ModuleType:
    """fedlora's full ClientApp module, which imports torch and the trainer: only where it runs here."""
    return importlib.import_module("fedlora.client.app")


def relay(msg: Message, context: Context) -> Message:
    folder = context.node_config.get(P.NODE_WORKER)
    if not folder:
        return _here().app(msg, context)
    try:
        return ask(Path(str(folder)), msg, context, PATIENCE_SECONDS)
    except WorkerUnavailable as err:
        unavailable = err

    def fail(_msg: Message, _context: Context) -> Message:
        raise unavailable

    # Reported like any failure: a fixed category to the coordinator, the detail and an audit line here.
    here = _here()
    return here.build_client_app(here.setup_from_node_config, handle=fail)(msg, context)


app = ClientApp()
app.train()(relay)
app.evaluate()(relay)
