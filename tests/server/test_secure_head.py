"""Head rounds under secure aggregation (server.secure_head, client.app's head stages): the real server
body (server.app.run_server) drives the real ClientApps of three virtual institutions in this process
(helpers.secagg), whose planner chooses head rounds (tiny-BERT, many peers, a compute cap that leaves
LoRA nothing). The coordinator learns only the sum of the head gradients, which carries the agreed sigma
C once; every ledger is charged at both epsilons before its masked vector leaves; a dropout after
masking is recovered, too few survivors discard the round and the federation goes on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord

from fedlora.client import head_rounds as H
from fedlora.client.ledger import STATISTICS_ROUND, PrivacyLedger
from fedlora.common import protocol as P
from fedlora.common.config import FedloraConfig, config_from_dict
from fedlora.common.head_gradient import CLIP, length
from fedlora.common.secure_aggregation.quantise import Quantiser
from fedlora.common.secure_aggregation.settings import for_head_gradient
from fedlora.server.app import ServerSettings, run_server
from fedlora.server.strategy import LoraStrategy
from fedlora.simulations.virtual_client import ledger_file
from helpers.secagg import NODES, SecAggGrid, inside_a_serverapp

ROUNDS = 2
LABELS = ("derm", "neuro", "resp")
WIDTH = 32  # tiny-bert's hidden size
VALUES = length(len(LABELS), WIDTH)


@pytest.fixture(autouse=True)
def _inside_a_serverapp(monkeypatch) -> None:
    inside_a_serverapp(monkeypatch)


def head_round_config(root: Path, dropouts: int = 0) -> FedloraConfig:
    words = {"derm": "red rash", "neuro": "bad headache", "resp": "dry cough"}
    rows = [{"text": f"note {i}: {words[LABELS[i % 3]]}", "label": LABELS[i % 3]} for i in range(90)]
    path = root / "train.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return config_from_dict(
        {
            "model": {"source": "tiny-bert"},
            "data": {"path": str(path), "max_length": 16},
            "training": {"peers_per_round": 1000, "examples_per_round": 6, "device": "cpu"},
            "privacy": {"accountant": "rdp", "epsilon": 8.0},
            "federation": {
                "rounds": ROUNDS,
                "min_clients": 3,
                "fraction_evaluate": 0,
                "central_eval": False,
                "secure_aggregation": True,
                "secagg_threshold": 2,
                "secagg_dropouts": dropouts,
            },
            "simulation": {"num_clients": 3, "partition": "iid"},
        }
    )


class HeadGrid(SecAggGrid):
    """Loses the replies of ``lost`` (stage, node) in head round 1 only (round 0 completes)."""

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        kept, lost = self.lost, set()
        if messages and messages[0].content[P.CONFIG].get(P.ROUND) == 1:
            lost = kept
        self.lost = lost
        try:
            return super().send_and_receive(messages, timeout)
        finally:
            self.lost = kept


class Federation:
    """One federation's record: each round's unmasked head sum, each institution's released vector by
    round (what its masked input quantised), and what the strategy's rounds returned."""

    def __init__(self, cfg: FedloraConfig, run_dir: Path, monkeypatch, lost=()) -> None:
        self.sums: dict[int, np.ndarray] = {}
        self.released: dict[int, list[torch.Tensor]] = {}
        self.stepped: dict[int, ArrayRecord | None] = {}
        real_round, real_aggregate = H.head_round, LoraStrategy.aggregate_train

        def head_round(*args, **kwargs):
            released = real_round(*args, **kwargs)
            self.released.setdefault(args[3], []).append(released.vector)
            return released

        def aggregate(strategy, server_round, replies, secured=None):
            arrays, metrics = real_aggregate(strategy, server_round, replies, secured)
            self.stepped[server_round] = arrays
            return arrays, metrics

        monkeypatch.setattr("fedlora.client.app.head_round", head_round)
        monkeypatch.setattr(LoraStrategy, "aggregate_train", aggregate)
        self.grid = HeadGrid(cfg, run_dir, lost)
        settings = ServerSettings(cfg, run_dir, len(NODES), on_secure_head=self.record_sum)
        run_server(self.grid, settings)
        self.history = json.loads((run_dir / "history.json").read_text())

    def record_sum(self, server_round: int, total: np.ndarray) -> None:
        self.sums[server_round] = total


def test_the_unmasked_sum_is_the_released_vectors_sum_and_every_ledger_is_charged_first(
    tmp_path, monkeypatch, opacus_epsilon
):
    cfg = head_round_config(tmp_path)
    run_dir = tmp_path / "run"
    fed = Federation(cfg, run_dir, monkeypatch)
    assert [e.get("head_gradients", 0) for e in fed.history] == [0] + [3] * ROUNDS
    error = Quantiser.of(for_head_gradient(None, 0, 0)).sum_error(len(NODES))
    for server_round in range(1, ROUNDS + 1):
        released = torch.stack(fed.released[server_round]).double().sum(0).numpy()
        assert fed.sums[server_round].shape == (VALUES,)
        assert np.abs(fed.sums[server_round] - released).max() <= error < 1e-5
        assert fed.history[server_round]["aggregation"]["secagg_survivors"] == 3.0
    sigmas = set()
    for pid in range(len(NODES)):
        ledger = PrivacyLedger.from_config(cfg.privacy, ledger_file(run_dir, pid))
        zero, *heads = ledger.entries
        assert zero.round == STATISTICS_ROUND and [e.round for e in heads] == [1, 2]
        audit_log = (run_dir / "audit" / f"client-{pid}.jsonl").read_text()
        audit = [json.loads(line) for line in audit_log.splitlines()]
        for entry in heads:
            sigma = entry.noise_multiplier
            sigmas.add(sigma)
            assert entry.share_noise_multiplier == pytest.approx(sigma / math.sqrt(3))
            steps = 1 + entry.round  # round 0's release and each head round: one step at sample rate 1
            assert entry.epsilon == pytest.approx(opacus_epsilon("rdp", [(sigma, 1.0, steps)]), rel=1e-6)
            alone = opacus_epsilon("rdp", [(sigma / math.sqrt(3), 1.0, steps)])
            assert entry.epsilon_alone == pytest.approx(alone, rel=1e-6) and alone > entry.epsilon
            lines = [a for a in audit if a["round"] == entry.round]
            stages = [a["configs"][P.CONFIG].get(P.SECAGG_STAGE) for a in lines]
            assert stages == [P.JOIN_SECURE_SUM, *P.SECAGG_STAGES]
            joined, masked = lines[0], lines[stages.index(P.MASKED_INPUT)]
            # charged after it joined (nothing charged then) and before its masked vector left
            assert joined["time"] < entry.time < masked["time"]
            assert masked["metrics"][P.METRICS][P.EPSILON] == pytest.approx(entry.epsilon)
            share = masked["metrics"][P.METRICS][P.NOISE_STD]
            assert share == pytest.approx(sigma * CLIP / math.sqrt(3))  # the planner's head clip
            assert P.NUM_EXAMPLES not in masked["metrics"][P.METRICS]
    assert len(sigmas) == 1  # one agreed sigma


def test_a_dropout_after_masking_is_recovered_and_too_few_survivors_discard_the_round(
    tmp_path, monkeypatch, caplog
):
    """One tolerated dropout: losing one masked vector in round 1 still unmasks the other two's sum;
    losing two discards round 1 (nothing unmasked, the head not stepped) and round 2 runs."""
    cfg = head_round_config(tmp_path, dropouts=1)
    fed = Federation(cfg, tmp_path / "one", monkeypatch, lost=[(P.MASKED_INPUT, NODES[2])])
    released = [v.double() for v in fed.released[1]]
    assert len(released) == 3  # all three masked; one vector never arrived
    expected = (released[0] + released[1]).numpy()
    assert np.abs(fed.sums[1] - expected).max() < 1e-5
    assert fed.history[1]["head_gradients"] == 2
    assert {d["node"] for d in fed.history[1]["dropped"]} == {NODES[2]}

    lost = [(P.MASKED_INPUT, NODES[1]), (P.MASKED_INPUT, NODES[2])]
    fed = Federation(cfg, tmp_path / "two", monkeypatch, lost=lost)
    assert 1 not in fed.sums and 2 in fed.sums  # nothing unmasked in round 1; round 2 ran
    assert fed.stepped[1] is None  # the head (and the global) stays
    assert fed.history[1]["head_gradients"] == 0 and fed.history[2]["head_gradients"] == 3
    assert "1 institutions sent masked vectors, fewer than the threshold 2" in caplog.text
    assert "the head is not stepped this round" in caplog.text


class Crash(Exception):
    """The coordinator dies while sending a round."""


class CrashingGrid(SecAggGrid):
    """Dies at the first message of round ``crash_in`` (after round ``crash_in - 1`` was checkpointed)."""

    crash_in = 2

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if messages and messages[0].content[P.CONFIG].get(P.ROUND) == self.crash_in:
            raise Crash(f"killed in round {self.crash_in}")
        return super().send_and_receive(messages, timeout)


def test_a_coordinator_restarted_after_a_secure_head_round_resumes_and_finishes(tmp_path):
    cfg = head_round_config(tmp_path)
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        run_server(CrashingGrid(cfg, run_dir), ServerSettings(cfg, run_dir, len(NODES)))
    sums: dict[int, np.ndarray] = {}
    settings = ServerSettings(cfg, run_dir, len(NODES), on_secure_head=sums.__setitem__)
    run_server(SecAggGrid(cfg, run_dir), settings)  # a restarted coordinator, the same institutions
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["round"] for e in history] == [0, 1, 2] and history[2]["head_gradients"] == 3
    assert list(sums) == [2]  # only the round not done before the crash
    for pid in range(len(NODES)):
        entries = PrivacyLedger.from_config(cfg.privacy, ledger_file(run_dir, pid)).entries
        assert [e.round for e in entries] == [STATISTICS_ROUND, 1, 2]  # each round charged once
