"""Durable file writes, shared by the privacy ledger and the server checkpoints."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_durably(path: Path, payload: bytes) -> None:
    """Temp file, fsync, rename, fsync the folder: the file is either old or new, never torn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
