"""A federation whose every institution planned statistics only (client.recipe: no LoRA steps, no
head rounds; the whole budget on round 0's release) ends after round 1 by design: the empty replies
say why (P.STATISTICS_ONLY), the server stops (server.app.end_if_nothing_trains), the history says so,
and the model card, the report and a resumed run read it. The real ServerApp body drives the real
ClientApps of two virtual institutions in this process (helpers.grid), on tiny-BERT."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from flwr.supercore.task_identity import TaskIdentity

from fedlora.client.ledger import PrivacyLedger
from fedlora.common import protocol as P
from fedlora.common.config import FedloraConfig, config_from_dict
from fedlora.server.app import NOTHING_TRAINS, ServerSettings, end_if_nothing_trains, run_server
from fedlora.server.history import RoundLog, summarise_round
from fedlora.simulations.cli import outcome
from fedlora.simulations.report import federated_result, write_all
from fedlora.simulations.run import prepare_run_dir
from fedlora.simulations.virtual_client import ledger_file
from helpers.grid import NODES, InProcessGrid

ROUNDS = 3
LABELS = ("derm", "neuro", "resp")


@pytest.fixture(autouse=True)
def _inside_a_serverapp(monkeypatch) -> None:
    for attribute in ("_run_id", "_node_id", "_task_id"):  # Message() as inside a ServerApp process
        monkeypatch.setattr(TaskIdentity, attribute, 1)


def statistics_only_config(root: Path, rounds: int = ROUNDS) -> FedloraConfig:
    """Two institutions of 30 rows whose planner spends the whole budget on round 0's statistics (a
    compute cap of 6 examples a round leaves DP-SGD nothing; 1 peer leaves head rounds nothing)."""
    words = {"derm": "red rash", "neuro": "bad headache", "resp": "dry cough"}
    rows = [{"text": f"note {i}: {words[LABELS[i % 3]]}", "label": LABELS[i % 3]} for i in range(60)]
    path = root / "train.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return config_from_dict(
        {
            "name": "stops",
            "model": {"source": "tiny-bert"},
            "data": {"path": str(path), "max_length": 16},
            "training": {"peers_per_round": 1, "examples_per_round": 6, "device": "cpu"},
            "privacy": {"accountant": "rdp", "epsilon": 8.0},
            "federation": {"rounds": rounds, "min_clients": 2, "fraction_evaluate": 0, "central_eval": False},
            "simulation": {"num_clients": 2, "partition": "iid"},
        }
    )


class CountingGrid(InProcessGrid):
    """The in-process grid, counting the train messages it delivers by round."""

    def __init__(self, cfg: FedloraConfig, run_dir: Path) -> None:
        super().__init__(cfg, run_dir)
        self.asked: list[int] = []

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.asked += [int(m.content[P.CONFIG][P.ROUND]) for m in messages]
        return super().send_and_receive(messages, timeout)


def federation(cfg: FedloraConfig, run_dir: Path, grid: InProcessGrid | None = None) -> CountingGrid:
    prepare_run_dir(cfg, run_dir)  # the saved config, as fedlora-simulate keeps it
    grid = grid or CountingGrid(cfg, run_dir)
    run_server(grid, ServerSettings(cfg=cfg, run_dir=run_dir, num_clients=len(NODES)))
    return grid


def test_institutions_that_all_plan_statistics_only_end_the_federation_after_round_1(tmp_path, caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="fedlora.server"):
        grid = federation(statistics_only_config(tmp_path), run_dir)
    assert grid.asked == [0, 0, 1, 1]  # round 0's statistics and round 1, nothing after
    line = f"round 1: {NOTHING_TRAINS}; stopping after round 1 of {ROUNDS}"
    assert [r.getMessage() for r in caplog.records].count(line) == 1
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["round"] for e in history] == [0, 1]
    assert history[1]["ended_early"] == NOTHING_TRAINS and history[1]["no_training"] == list(NODES)
    assert history[1]["statistics_only"] == 2 and not history[1]["dropped"]
    assert json.loads((run_dir / "adapter" / "fedlora.json").read_text())["exported_round"]["round"] == 1

    stated = f"1 of {ROUNDS} planned: the federation ended after round 1 by design, as {NOTHING_TRAINS}"
    card = (run_dir / "adapter" / "README.md").read_text()
    assert f"- rounds: {stated}" in card
    assert f"an empty update, steps 0 and {P.PLAN} {P.STATISTICS_ONLY}" in card
    assert summarise_round(history[1]).line(ROUNDS).endswith(f"; the federation ends here: {NOTHING_TRAINS}")
    assert outcome(history).endswith(f"; ended after round 1: {NOTHING_TRAINS}")
    write_all(run_dir, "stops")
    assert f"- rounds: {stated}" in (run_dir / "report.md").read_text()
    assert (run_dir / "epsilon.png").exists()
    # --compare's federated row: round 0's rows and spend, not the empty last round's 0 and 0
    compared = federated_result(history)
    assert compared["rows"] == 60 and compared["epsilon"] == pytest.approx(8.0, abs=0.01)


def test_a_resumed_federation_that_ended_early_runs_nothing_more(tmp_path, caplog):
    """Same config, or more rounds: every institution's budget went to round 0, so no round is sent
    again, no ledger charged, the history and export unchanged."""
    run_dir = tmp_path / "run"
    cfg = statistics_only_config(tmp_path)
    federation(cfg, run_dir)
    before = (run_dir / "history.json").read_text()
    spent = [PrivacyLedger.from_config(cfg.privacy, ledger_file(run_dir, pid)).entries for pid in (0, 1)]
    for again in (cfg, statistics_only_config(tmp_path, rounds=ROUNDS + 2)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fedlora.server"):
            grid = federation(again, run_dir)
        assert grid.asked == []
        assert f"round 1: {NOTHING_TRAINS}; stopping after round 1 of" in caplog.text
        assert (run_dir / "history.json").read_text() == before
    after = [PrivacyLedger.from_config(cfg.privacy, ledger_file(run_dir, pid)).entries for pid in (0, 1)]
    assert after == spent


def test_one_institution_that_trains_keeps_the_federation_to_its_last_round(tmp_path):
    """Node 202 trains LoRA (DP off), node 101 plans statistics only: every round is run."""
    run_dir = tmp_path / "run"
    cfg = statistics_only_config(tmp_path)
    grid = CountingGrid(cfg, run_dir)
    trains = grid.setups[NODES[1]]
    plain = dataclasses.replace(cfg.privacy, enabled=False)
    grid.setups[NODES[1]] = dataclasses.replace(trains, cfg=dataclasses.replace(cfg, privacy=plain))
    federation(cfg, run_dir, grid)
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["round"] for e in history] == list(range(ROUNDS + 1))
    assert not any(e.get("ended_early") for e in history)
    assert all(e["no_training"] == [NODES[0]] and len(e["clients"]) == 1 for e in history[1:])


class Nodes:
    def __init__(self, *nodes: int) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return self.nodes


def decided(record: RoundLog, connected: Nodes, server_round: int = 1, rounds: int = 8) -> str:
    end_if_nothing_trains(SimpleNamespace(rounds=[record]), connected, server_round, rounds)
    return record.ended_early


def said(*nodes: int, **fields) -> RoundLog:
    return RoundLog(round=1, statistics_only=len(nodes), no_training=list(nodes), **fields)


def test_the_federation_goes_on_where_any_institution_may_still_train():
    assert decided(said(1, 2), Nodes(1, 2)) == NOTHING_TRAINS
    assert decided(said(1, 2), Nodes(1, 2, 3)) == ""  # node 3 not sampled, or no answer: it may train
    budget = {"node": 3, "reason": P.FAILURES[P.BUDGET_EXHAUSTED]}
    assert decided(said(1, 2, dropped=[budget]), Nodes(1, 2, 3)) == ""  # a refusal, not a plan
    assert decided(said(1, 2, dropped=[budget]), Nodes(1, 2)) == ""
    unsaid = RoundLog(round=1, statistics_only=2, no_training=[1])  # node 2: steps 0, no reason given
    assert decided(unsaid, Nodes(1, 2)) == ""
    assert decided(said(1, head_gradients=1), Nodes(1)) == ""
    assert decided(said(1, clients=[{"node": 2}]), Nodes(1, 2)) == ""
    assert decided(said(), Nodes()) == ""  # no reply at all
    assert decided(said(1, 2), Nodes(1, 2), server_round=8) == ""  # the last round: nothing to end early
