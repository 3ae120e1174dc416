"""FFA-LoRA and mixed ranks through real simulations, checked on the messages themselves."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from flwr.app import Array

from fedlora.client.ledger import STATISTICS_ROUND
from fedlora.common import protocol as P
from fedlora.common.config import load_config
from fedlora.server.checkpoint import load_checkpoint
from fedlora.simulations.run import simulate

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BASE = [
    "model.source=tiny-bert",
    "data.max_length=48",
    "training.local_steps=3",
    "training.batch_size=16",
    "training.learning_rate=0.02",
    "federation.rounds=3",
    "federation.min_clients=3",
    "federation.fraction_evaluate=0",
    "simulation.num_clients=3",
    "simulation.partition=iid",
    "privacy.epsilon=8",
]
RANKS = (4, 8, 16)


def audit(run_dir: Path, pid: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "audit" / f"client-{pid}.jsonl").open()]


def train_lines(run_dir: Path, pid: int) -> list[dict]:
    """The LoRA rounds' train replies. Round 0 (statistics first) is a train reply too, but it carries
    the class sums and counts, no LoRA tensor: it is left out here and checked on its own below."""
    return [
        line
        for line in audit(run_dir, pid)
        if "arrays" in line and line["type"] == "train" and line["round"] != STATISTICS_ROUND
    ]


def statistics_lines(run_dir: Path, pid: int) -> list[dict]:
    return [
        line for line in audit(run_dir, pid) if line["type"] == "train" and line["round"] == STATISTICS_ROUND
    ]


@pytest.fixture(scope="module")
def ffa_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ffa")
    simulate(load_config(overrides=[*BASE, "model.variant=ffa", "federation.aggregator=ffa"]), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("mixed")
    ranks = f"simulation.client_ranks=[{', '.join(map(str, RANKS))}]"
    simulate(load_config(overrides=[*BASE, "model.lora_r=16", "federation.aggregator=exact", ranks]), run_dir)
    return run_dir


def test_ffa_sends_only_b_and_the_head(ffa_run: Path) -> None:
    for pid in range(3):
        [stats] = statistics_lines(ffa_run, pid)  # round 0: sums and counts only, no LoRA tensor
        assert set(stats["arrays"][P.ARRAYS]) == {P.CLASS_SUMS, P.CLASS_COUNTS}
        lines = train_lines(ffa_run, pid)
        assert [line["round"] for line in lines] == [1, 2, 3]
        for line in lines:
            keys = set(line["arrays"]["arrays"])
            assert keys and not any(".lora_A." in k for k in keys)
            assert any(".lora_B." in k for k in keys)
            received = set(line["received"])
            assert {k for k in received if ".lora_A." not in k} == keys


def test_ffa_a_is_bit_identical_everywhere_across_rounds(ffa_run: Path) -> None:
    seen = {
        (k, v["sha256"])
        for pid in range(3)
        for line in train_lines(ffa_run, pid)
        for k, v in line["received"].items()
        if ".lora_A." in k
    }
    server = load_checkpoint(ffa_run / "checkpoint").adapter
    server_a = {
        (k, hashlib.sha256(Array.from_torch_tensor(v).data).hexdigest()[:16])
        for k, v in server.items()
        if ".lora_A." in k
    }
    assert seen == server_a  # one digest per A tensor: the same for every client, round and the server


def test_ffa_halves_the_lora_traffic(ffa_run: Path) -> None:
    line = train_lines(ffa_run, 0)[0]
    sent = line["arrays"]["arrays"]
    received = line["received"]
    lora_sent = sum(_numel(v["shape"]) for k, v in sent.items() if ".lora_" in k)
    lora_full = sum(_numel(v["shape"]) for k, v in received.items() if ".lora_" in k)
    assert lora_sent * 2 == lora_full


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_mixed_ranks_each_client_sends_and_receives_its_own_rank(mixed_run: Path) -> None:
    for pid, rank in enumerate(RANKS):
        [stats] = statistics_lines(mixed_run, pid)  # round 0: sums and counts only, no LoRA tensor
        assert set(stats["arrays"][P.ARRAYS]) == {P.CLASS_SUMS, P.CLASS_COUNTS}
        lines = train_lines(mixed_run, pid)
        assert [line["round"] for line in lines] == [1, 2, 3]
        for line in lines:
            for key, spec in line["arrays"]["arrays"].items():
                if ".lora_A." in key:
                    assert spec["shape"][0] == rank, (pid, key, spec)
                if ".lora_B." in key:
                    assert spec["shape"][1] == rank, (pid, key, spec)
        # Round 1: the server does not know the node's rank yet and sends rank 16 (the client
        # truncates it itself); from round 2 on it sends the node's own rank.
        # Below the global rank, it is also sent what its truncation drops, at rank 16 - its own.
        for line in lines[1:]:
            received = line["received"]
            a_shapes = {v["shape"][0] for k, v in received.items() if ".lora_A." in k and "/" not in k}
            assert a_shapes == {rank}, (pid, line["round"], a_shapes)
            fold = {k: v for k, v in received.items() if k.startswith(f"{P.FOLD}/")}
            assert {v["shape"][0] for k, v in fold.items() if ".lora_A." in k} == (
                {max(RANKS) - rank} if rank < max(RANKS) else set()
            ), (pid, line["round"])


def test_mixed_ranks_global_stays_at_the_server_rank(mixed_run: Path) -> None:
    ckpt = load_checkpoint(mixed_run / "checkpoint")
    assert ckpt.round == 3
    assert {v.shape[0] for k, v in ckpt.adapter.items() if ".lora_A." in k} == {16}
    history = json.loads((mixed_run / "history.json").read_text())
    assert all(not e.get("dropped") for e in history)
    assert all("residual/mean" in e["aggregation"] for e in history[1:])
