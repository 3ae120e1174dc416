"""Experiment tracking (``--track``): a run's resolved config, per-round metrics and run-folder files
logged to MLflow, an optional extra (``pip install 'fedlora[track]'``).

Only what the run folder already holds is logged: the config as saved there, aggregate scores per
round, each institution's reported epsilon, drop counts, audit bounds, and files the caller names.
The default store is MLflow's file store in ``<out>/mlruns``, so a run is tracked offline and
``mlflow ui --backend-store-uri <out>/mlruns`` shows it (MLflow 3 keeps that store behind
``MLFLOW_ALLOW_FILE_STORE=true``, which this module sets for the process while a run is tracked).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedlora.common.errors import ConfigError

EXTRA = "track"
STORE_FOLDER = "mlruns"
DEFAULT = ""
"""The value of a bare ``--track``: the file store in the run folder."""
FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"
PARAM_LIMIT = 6000
"""MLflow refuses a param value longer than this (a long prompt template): it is cut."""
TRACK_HELP = (
    "log the config, per-round metrics, epsilon per institution and the run's files to MLflow "
    f"(needs the '{EXTRA}' extra); URI: an MLflow tracking URI (default: a file store in "
    f"<out>/{STORE_FOLDER}; view it with the full mlflow package: MLFLOW_ALLOW_FILE_STORE=true mlflow ui "
    f"--backend-store-uri <out>/{STORE_FOLDER})"
)


def add_track_argument(parser: Any) -> None:
    """``--track [URI]`` the same on every command that trains."""
    parser.add_argument("--track", nargs="?", const=DEFAULT, default=None, metavar="URI", help=TRACK_HELP)


def require_mlflow() -> None:
    """Refuse ``--track`` in one line before a run starts when MLflow is not installed."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"--track: MLflow is not installed; install the extra: pip install 'fedlora[{EXTRA}]'"
        ) from None


def store_uri(track: str, out: Path) -> str:
    """The tracking URI ``--track`` names, or the file store inside the run folder."""
    return track or (out.resolve() / STORE_FOLDER).as_uri()


def flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys (``privacy.epsilon``), values as text (cut to
    MLflow's PARAM_LIMIT)."""
    found: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            found.update(flat(value, f"{name}."))
        else:
            found[name] = str(value)[:PARAM_LIMIT]
    return found


class Tracker:
    """One MLflow run; every method does nothing when tracking is off (``client`` None)."""

    def __init__(self, client: Any = None, run_id: str = "") -> None:
        self.client, self.run_id = client, run_id

    def params(self, config: Mapping[str, Any]) -> None:
        if self.client is not None:
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat(config).items()])

    def metrics(self, values: Mapping[str, float], step: int = 0) -> None:
        if self.client is not None and values:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in values.items()]
            self.client.log_batch(self.run_id, metrics=batch)

    def artifacts(self, paths: Iterable[Path]) -> None:
        """Files and folders of the run folder, each under its own name; missing ones are skipped."""
        if self.client is None:
            return
        for path in paths:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path))


@contextmanager
def tracked(track: str | None, out: Path, experiment: str) -> Iterator[Tracker]:
    """A run named after the run folder in ``experiment``, ended FINISHED, or FAILED on an error; a
    no-op tracker when ``track`` is None (no ``--track``)."""
    if track is None:
        yield Tracker()
        return
    require_mlflow()
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    opted_in = os.environ.get(FILE_STORE_OPT_IN)
    os.environ[FILE_STORE_OPT_IN] = "true"
    try:
        uri = store_uri(track, out)
        try:
            client = MlflowClient(uri)
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            run_id = client.create_run(experiment_id, run_name=out.resolve().name).info.run_id
        except (MlflowException, OSError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"--track: {uri}: cannot start an MLflow run ({first})") from None
        status = "FAILED"
        try:
            yield Tracker(client, run_id)
            status = "FINISHED"
        finally:
            client.set_terminated(run_id, status)
    finally:
        if opted_in is None:
            os.environ.pop(FILE_STORE_OPT_IN, None)
        else:
            os.environ[FILE_STORE_OPT_IN] = opted_in
