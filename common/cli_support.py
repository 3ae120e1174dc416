"""What every fedlora command does the same way: its config arguments, its run folder, one-line
errors, quiet libraries, results on stdout and diagnostics on stderr, progress bars."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedlora.common.config import FedloraConfig, load_config
from fedlora.common.errors import ConfigError, FedloraError

console = Console(stderr=True)  # progress and errors
report = Console()  # results a person may redirect to a file


def add_config_arguments(
    parser: argparse.ArgumentParser, persona: str, default: str | None = None, *, as_is: str | None = None
) -> None:
    """CONFIG and --set, the same on every command. CONFIG may be left out (the persona's packaged
    preset, or the built-in defaults), except where the file itself is what counts (``as_is`` says
    why: Flower's processes read it, or it names a running deployment): there it is required, and
    --set, which would not reach those processes, is not offered."""
    if as_is is not None:
        parser.add_argument("config", help=f"the {persona}'s YAML config ({as_is})")
        return
    parser.add_argument(
        "config", nargs="?", help=f"the {persona}'s YAML config (default: {default or 'built-in defaults'})"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. privacy.epsilon=4 (repeatable)",
    )


def add_out_argument(parser: argparse.ArgumentParser, holds: str) -> None:
    parser.add_argument(
        "--out", type=Path, help=f"the run folder: {holds} (default: runs/<config name>-<time>)"
    )


def finish_help(parser: argparse.ArgumentParser, persona: str, *examples: str) -> None:
    """Every command's --help the same way: plain text (docstrings' ``quotes`` dropped), then an
    example and where every key of the persona's config is listed."""
    parser.description = (parser.description or "").replace("``", "")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    shown = "\n".join(f"  {example}" for example in examples)
    parser.epilog = (
        f"example:\n{shown}\n\nevery config key, with its help and range: "
        f"python -m fedlora.common.config {persona}"
    )


def create_folder(path: Path, option: str) -> Path:
    """The folder, made if missing, or one line naming the option that chose it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{option}: cannot create {path} ({err.strerror or err})") from None
    return path


def run_folder(out: Path | None, name: str) -> Path:
    """``--out``, or a fresh ``runs/<name>-<time>`` under the current folder."""
    return out if out is not None else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """For the length of a command: Transformers' advice and loading bars off (fedlora loads local
    models only, and says what matters itself); restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def run_cli(handler: Callable[[], int | None]) -> int:
    """Run a command; a FedloraError becomes ``error: <one line>`` and exit code 2, no traceback."""
    try:
        with quiet_libraries():
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
def progress_bar(description: str, total: int | None, loss: bool = True):
    """A rich progress bar on stderr; yields ``advance(loss, steps=1)`` (no loss column for a job
    without a loss, such as predictions; a ``total`` of None: not known in advance). Off a terminal
    (a log file, a batch job) it writes nothing: bar text would only clutter the log."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *((TextColumn("loss {task.fields[loss]}"),) if loss else ()),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total, loss="-")

        def advance(loss: float = math.nan, steps: int = 1) -> None:
            bar.update(task, advance=steps, loss=f"{loss:.4f}" if loss == loss else "-")

        yield advance
