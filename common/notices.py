"""Known, understood notices of the libraries, dropped from their loggers where they arise."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class DropNotices(logging.Filter):
    """Drops a logger's records whose message contains any of ``texts``."""

    def __init__(self, *texts: str) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


@contextmanager
def without_notices(logger: logging.Logger, *texts: str) -> Iterator[None]:
    """``logger`` without the records naming ``texts``, for the block only."""
    drop = DropNotices(*texts)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
