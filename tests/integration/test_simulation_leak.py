"""No part of an institution's rows reaches any file the coordinator writes, whatever fails on the
client. One real simulation (Flower's engine, Ray, tiny-BERT, real Opacus, 2 rounds) of six virtual
institutions: one honest, the others each failing another way, in training and in evaluation.

The label values of the data are the federation's declared label set (public to the coordinator);
the texts are not, and a misconfigured label column turns them into labels: every text carries a
marker that no file of the coordinator may contain, even in part.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray.cloudpickle
from flwr.app import Context

from fedlora.client.app import ClientSetup
from fedlora.client.ledger import STATISTICS_ROUND
from fedlora.common import protocol as P
from fedlora.common.config import load_config
from fedlora.common.protocol import STATISTICS_SENSITIVITY
from fedlora.simulations import run as sim_run
from fedlora.simulations.report import write_all
from fedlora.simulations.virtual_client import ledger_file

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MARKER = "zqx"
LABELS = ("neg", "pos")
# partition id -> (config section, key, value) that makes it fail, and what the coordinator may see
FAILURES: dict[int, tuple[str, str, object, str]] = {
    1: ("data", "label_column", "text", "data error"),
    2: ("data", "text_column", "notes", "data error"),
    3: ("privacy", "planned_rounds", 1, "budget exhausted"),  # trains round 1, refuses round 2
    4: ("model", "init_seed", 1, "fingerprint mismatch"),
    5: ("model", "lora_alpha", 1e38, "training diverged"),
}
CLIENTS = 6


@dataclass(frozen=True)
class Misconfigured:
    """Wraps the simulation's setup: partition p gets the failure FAILURES[p] in its own config."""

    inner: object

    def __call__(self, context: Context) -> ClientSetup:
        setup = self.inner(context)
        if setup.client_id not in FAILURES:
            return setup
        section, key, value, _ = FAILURES[setup.client_id]
        part = dataclasses.replace(getattr(setup.cfg, section), **{key: value})
        return dataclasses.replace(setup, cfg=dataclasses.replace(setup.cfg, **{section: part}))


def write_rows(path: Path, rows: int, tag: str) -> Path:
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["text", "label"])
        out.writerows(
            [f"patient {tag}-{i:03d} {MARKER} reports chest pain", LABELS[i % 2]] for i in range(rows)
        )
    return path


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The run folder and everything the coordinator's side printed or logged."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    root = tmp_path_factory.mktemp("leak")
    cfg = load_config(
        overrides=[
            "model.source=tiny-bert",
            f"data.path={write_rows(root / 'train.csv', 8 * CLIENTS, 'train')}",
            f"data.eval_path={write_rows(root / 'eval.csv', 4 * CLIENTS, 'eval')}",
            "data.labels=[neg, pos]",
            "data.max_length=24",
            "training.local_steps=2",
            "training.batch_size=8",
            "privacy.epsilon=50",
            "privacy.planned_rounds=2",
            "federation.rounds=2",
            "federation.min_clients=1",
            "federation.fraction_evaluate=1",
            f"simulation.num_clients={CLIENTS}",
            "simulation.partition=iid",
        ]
    )
    run_dir = root / "run"
    original = sim_run.build_client_app
    sim_run.build_client_app = lambda setup: original(Misconfigured(setup))
    handler = ListHandler()
    loggers = [logging.getLogger(), logging.getLogger("flwr")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        sim_run.simulate(cfg, run_dir)
    finally:
        sim_run.build_client_app = original
        for logger in loggers:
            logger.removeHandler(handler)
    write_all(run_dir, "leak test")
    return run_dir, "\n".join(handler.lines)


class ListHandler(logging.Handler):
    """Every log record of this (the coordinator's) process, formatted, tracebacks included."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(logging.Formatter().format(record))


def coordinator_files(run_dir: Path) -> list[Path]:
    """What the coordinator's side wrote: all but the institutions' own ledgers and audit/error logs."""
    return [
        p
        for p in run_dir.rglob("*")
        if p.is_file() and not {"ledgers", "audit"} & set(p.relative_to(run_dir).parts)
    ]


def audit(run_dir: Path, pid: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "audit" / f"client-{pid}.jsonl").open()]


def test_no_part_of_a_row_reaches_any_file_or_log_of_the_coordinator(federation) -> None:
    run_dir, logged = federation
    files = coordinator_files(run_dir)
    names = {p.name for p in files}
    assert {"history.json", "metrics.json", "metrics.csv", "report.md", "adapter.safetensors"} <= names
    assert any(p.parent.name.startswith("round-") for p in files)  # the checkpoint
    leaking = [p for p in files if MARKER.encode() in p.read_bytes()]
    assert not leaking
    assert "dropped train reply" in logged and MARKER not in logged


def test_each_failure_reaches_the_coordinator_as_its_category(federation) -> None:
    run_dir, _ = federation
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["round"] for e in history] == [0, 1, 2]
    expected = sorted(reason for p, (*_, reason) in FAILURES.items() if p != 3)
    assert sorted(d["reason"] for d in history[1]["dropped"]) == expected
    assert sorted(d["reason"] for d in history[2]["dropped"]) == sorted([*expected, "budget exhausted"])
    assert [len(e["clients"]) for e in history[1:]] == [2, 1]


def test_every_outgoing_message_is_audited_and_no_unnoised_statistic_leaves(federation) -> None:
    run_dir, _ = federation
    for pid in range(CLIENTS):
        lines = audit(run_dir, pid)
        assert sorted((line["type"], line["round"]) for line in lines) == [
            ("evaluate", 1),
            ("evaluate", 2),
            ("train", 0),  # round 0: the class statistics (a train message at the statistics stage)
            ("train", 1),
            ("train", 2),
        ]
        for line in lines:
            if "error" in line:
                assert set(line) == {"time", "type", "error", "round", "received"}
                assert line["error"]["category"] in {reason for *_, reason in FAILURES.values()}
            elif line["round"] == STATISTICS_ROUND:
                # The statistics release is noised: exactly the sums and counts, with the noise std
                # of the ledger's round-0 entry (sigma x sensitivity), never an exact statistic.
                assert set(line["arrays"][P.ARRAYS]) == {P.CLASS_SUMS, P.CLASS_COUNTS}
                sent = line["metrics"][P.METRICS]
                assert not [k for k in sent if k in P.EVALUATE_OPTIONAL or k.startswith(P.RECALL)]
                entries = json.loads(ledger_file(run_dir, pid).read_text())["entries"]
                [charged] = [e for e in entries if e["round"] == STATISTICS_ROUND]
                assert sent[P.NOISE_STD] > 0
                assert sent[P.NOISE_STD] == pytest.approx(
                    charged["noise_multiplier"] * STATISTICS_SENSITIVITY
                )
                assert sent[P.EPSILON] > 0
            else:
                sent = line["metrics"]["metrics"]
                assert not [k for k in sent if k in P.EVALUATE_OPTIONAL or k.startswith(P.RECALL)]
    assert all("error" not in line for line in audit(run_dir, 0))
    assert [line["error"]["category"] for line in audit(run_dir, 3) if "error" in line] == [
        "budget exhausted"
    ]


def test_the_detail_stays_in_the_institutions_own_log(federation) -> None:
    run_dir, _ = federation
    assert MARKER in (run_dir / "audit" / "client-1-errors.log").read_text()
    assert "missing column 'notes'" in (run_dir / "audit" / "client-2-errors.log").read_text()
    assert "not finite" in (run_dir / "audit" / "client-5-errors.log").read_text()
    assert not (run_dir / "audit" / "client-0-errors.log").exists()
