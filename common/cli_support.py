"""What every fedlora command does the same way: one-line errors, config loading, progress bars."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedlora.common.config import FedloraConfig, load_config
from fedlora.common.errors import FedloraError

console = Console(stderr=True)  # progress and errors
report = Console()  # results a person may redirect to a file


def run_cli(handler: Callable[[], int | None]) -> int:
    """Run a command; a FedloraError becomes ``error: <one line>`` and exit code 2, no traceback."""
    try:
        return handler() or 0
    except FedloraError as err:
        console.print(f"error: {err}", highlight=False, soft_wrap=True, markup=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


def read_config(path: str | None, overrides: Sequence[str] = (), persona: str | None = None) -> FedloraConfig:
    """A command's config for the persona it serves (see common/config.py's PERSONAS)."""
    if path is not None and not Path(path).exists():
        raise FedloraError(f"{path}: config file not found")
    return load_config(path, overrides, persona)


@contextmanager
def progress_bar(description: str, total: int, loss: bool = True):
    """A rich progress bar on stderr; yields ``advance(loss, steps=1)`` (no loss column for a job
    without a loss, such as predictions)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *((TextColumn("loss {task.fields[loss]}"),) if loss else ()),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, loss="-")

        def advance(loss: float = math.nan, steps: int = 1) -> None:
            bar.update(task, advance=steps, loss=f"{loss:.4f}" if loss == loss else "-")

        yield advance
