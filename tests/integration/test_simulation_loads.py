"""Through Flower's simulation engine (Ray): each process loads the base model once and keeps it
across rounds and evaluations, whichever virtual institutions it serves."""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray.cloudpickle
from flwr.app import Context

from fedlora.client.app import ClientSetup
from fedlora.common.config import load_config
from fedlora.common.model import _base_template
from fedlora.simulations import run as sim_run

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROUNDS, CLIENTS = 3, 2


@dataclass(frozen=True)
class RecordingLoads:
    """Wraps the simulation's setup: before each message, the base-model loads of this process so far."""

    inner: object
    record: Path

    def __call__(self, context: Context) -> ClientSetup:
        with self.record.open("a") as out:
            out.write(json.dumps([os.getpid(), _base_template.cache_info().misses]) + "\n")
        return self.inner(context)


def test_each_process_loads_the_base_model_once_across_rounds_and_evaluations(tmp_path) -> None:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = load_config(
        overrides=[
            "model.source=tiny-bert",
            "data.max_length=32",
            "training.local_steps=1",
            "training.batch_size=8",
            f"federation.rounds={ROUNDS}",
            f"federation.min_clients={CLIENTS}",
            "federation.fraction_evaluate=1",
            f"simulation.num_clients={CLIENTS}",
            "privacy.epsilon=100",
        ]
    )
    record = tmp_path / "loads.jsonl"
    original = sim_run.build_client_app
    sim_run.build_client_app = lambda setup: original(RecordingLoads(setup, record))
    try:
        sim_run.simulate(cfg, tmp_path / "run")
    finally:
        sim_run.build_client_app = original

    by_process: dict[int, list[int]] = defaultdict(list)
    for line in record.read_text().splitlines():
        pid, loads = json.loads(line)
        by_process[pid].append(loads)
    audit = [json.loads(x) for f in (tmp_path / "run" / "audit").glob("*.jsonl") for x in f.open()]
    # Round 0 (statistics first) is one more train message per client, on the same kept model.
    assert sorted((a["type"], a["round"]) for a in audit) == sorted(
        [("evaluate", r) for r in range(1, ROUNDS + 1)] * CLIENTS
        + [("train", r) for r in range(ROUNDS + 1)] * CLIENTS
    )
    assert all("error" not in a for a in audit)
    for loads in by_process.values():
        # Loaded once, while handling the process's first message, then kept.
        assert loads == sorted(loads) and loads[-1] == 1, by_process
    # The setup runs twice per message (the audit mod asks it for the log's path): a process that
    # served several rounds kept its model.
    assert max(loads.count(1) for loads in by_process.values()) >= 2 * ROUNDS
