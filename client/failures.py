"""What an institution tells the coordinator when it fails: a fixed category and code, never the detail.

An exception's text can quote the institution's data (a stray label is a patient's sentence), and
Flower forwards an escaped exception's text to the coordinator. This mod catches every exception of
the handler, keeps the detail in the institution's own log (a local file and Python logging) and
replies with an error that names only the category.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Error, Message

from fedlora.common import protocol as P
from fedlora.common.errors import (
    AdapterError,
    BudgetExceeded,
    CheckpointError,
    ConfigError,
    DataError,
    ModelError,
    TrainingDiverged,
)

log = logging.getLogger("fedlora.client")
Next = Callable[[Message, Context], Message]


class FingerprintMismatch(AdapterError):
    """The global adapter is for another base model, label set or LoRA layout."""


INTERNAL = 100
# Most specific first: the first class an exception is an instance of names its code.
CODES: tuple[tuple[type[Exception], int], ...] = (
    (FingerprintMismatch, 105),
    (TrainingDiverged, 107),
    (BudgetExceeded, P.BUDGET_EXHAUSTED),
    (ConfigError, 101),
    (DataError, 102),
    (ModelError, 103),
    (AdapterError, 104),
    (CheckpointError, 108),
)


def classify(err: BaseException) -> tuple[int, str]:
    """The code and fixed reason (common.protocol.FAILURES) the coordinator may see for ``err``."""
    code = next((code for kind, code in CODES if isinstance(err, kind)), INTERNAL)
    return code, P.FAILURES[code]


def reason_for(code: int) -> str:
    """The fixed reason of a fedlora failure code; any other code is reported as unknown."""
    return P.FAILURES.get(code, "unknown")


def failure_reply(msg: Message, err: BaseException) -> Message:
    code, reason = classify(err)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def write_local(path: Path, msg: Message, err: BaseException) -> None:
    """Append the whole failure, traceback included, to the institution's own error log."""
    code, reason = classify(err)
    detail = "".join(traceback.format_exception(err))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(
            f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {msg.metadata.message_type}: "
            f"sent '{reason}' (code {code}) to the coordinator instead of:\n{detail}\n"
        )


def failure_mod(log_for: Callable[[Context], Path | None]) -> Callable[[Message, Context, Next], Message]:
    """A mod turning any exception of the handler into an error reply naming only its category; the
    detail goes to the file ``log_for(context)`` names (None: Python logging only)."""

    def mod(msg: Message, context: Context, call_next: Next) -> Message:
        try:
            return call_next(msg, context)
        except Exception as err:
            reply = failure_reply(msg, err)
            log.error(
                "%s failed; the coordinator is told only '%s'",
                msg.metadata.message_type,
                reply.error.reason,
                exc_info=err,
            )
            try:
                path = log_for(context)
                if path is not None:
                    write_local(path, msg, err)
            except OSError:
                log.exception("could not write the local error log; the failure above is logged here only")
            return reply

    return mod
