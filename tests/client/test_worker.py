"""The institution's worker and the relay that hands it Flower's messages (client.worker,
client.relay): what is cached is dropped when its files change, and a worker that cannot be reached
fails the message the way any failure does (a fixed category out, the detail and an audit line here).
The whole path through real Flower processes: test_deployment.py."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import stat
import sys
from pathlib import Path

import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedlora.client import relay, worker
from fedlora.client.app import shared_data
from fedlora.client.secure_statistics import ROUND, STATE, secure_statistics
from fedlora.client.worker import Freshness
from fedlora.common import protocol as P
from fedlora.common.codec import advert_parts, parse_advert, parse_shares
from fedlora.common.config import load_config
from fedlora.common.model import build_model, forget_base_models
from fedlora.common.secure_aggregation.client import ClientRound
from fedlora.common.secure_aggregation.settings import for_statistics
from fedlora.server.secure_sum import as_bytes
from helpers.deploy import write_csv
from helpers.identities import identities
from helpers.messages import metadata


def institution(tmp_path: Path) -> Path:
    write_csv(tmp_path / "data.csv", 12, seed=0)
    config = {
        "model": {"source": "tiny-bert"},
        "training": {"device": "cpu"},
        "data": {"path": "data.csv", "labels": ["neg", "pos"], "max_length": 16},
        "privacy": {"epsilon": 8, "ledger_path": "ledger.json", "audit_log": str(tmp_path / "audit.jsonl")},
    }
    path = tmp_path / "institution.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def context(config: Path, worker: Path | None = None) -> Context:
    node = {P.NODE_CONFIG: str(config)} | ({P.NODE_WORKER: str(worker)} if worker else {})
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})


def test_a_changed_data_file_is_read_again_and_the_model_kept(tmp_path, caplog) -> None:
    config = institution(tmp_path)
    cfg = load_config(str(config), persona="institution")
    fresh = Freshness()

    def load() -> int:
        fresh.check(context(config))
        tokenizer, bundle = shared_data(cfg)
        build_model(cfg.model, bundle.labels, len(tokenizer))
        return len(bundle.train)

    forget_base_models()
    with caplog.at_level(logging.INFO, logger="fedlora.model"):
        assert [load(), load(), load()] == [12, 12, 12]
        write_csv(tmp_path / "data.csv", 14, seed=1)
        assert [load(), load()] == [14, 14]
    assert len(loads(caplog)) == 1


def loads(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded base model")]


def test_the_worker_folder_and_key_are_private(tmp_path) -> None:
    folder = tmp_path / "worker"
    relay.open_folder(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / relay.KEY).stat().st_mode) == 0o600
    assert len((folder / relay.KEY).read_bytes()) == 32


def test_an_unreachable_worker_fails_the_message_as_an_internal_error(tmp_path, monkeypatch) -> None:
    config = institution(tmp_path)
    folder = tmp_path / "worker"
    relay.open_folder(folder)
    monkeypatch.setattr(relay, "PATIENCE_SECONDS", 0.2)
    msg = Message(content=RecordDict({P.CONFIG: ConfigRecord({P.ROUND: 3})}), metadata=metadata(0, 7))

    reply = relay.relay(msg, context(config, folder))

    assert reply.has_error() and reply.error.reason == "internal error"
    [line] = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert line["error"]["category"] == "internal error" and line["round"] == 3
    local = (tmp_path / "audit-errors.log").read_text()
    assert "no worker listening after 0.2 s" in local
    assert not (tmp_path / "ledger.json").exists()


def test_without_a_worker_the_relay_handles_the_message_itself(tmp_path) -> None:
    config = institution(tmp_path)
    msg = Message(content=RecordDict({P.CONFIG: ConfigRecord({P.ROUND: 1})}), metadata=metadata(0, 7))
    reply = relay.relay(msg, context(config))
    # Handled here: the ClientApp built the model and refused a message without its fingerprint.
    assert reply.has_error() and reply.error.reason == "fingerprint mismatch"
    local = (tmp_path / "audit-errors.log").read_text()
    assert "fingerprint" in local and "no worker" not in local


def test_a_worker_process_answers_the_holder_of_its_key_only(tmp_path, processes) -> None:
    config = institution(tmp_path)
    folder = tmp_path / "w"
    relay.open_folder(folder)
    processes.start("worker", [sys.executable, "-m", "fedlora.client.worker", str(folder)])
    msg = Message(content=RecordDict({P.CONFIG: ConfigRecord({P.ROUND: 2})}), metadata=metadata(0, 7))

    reply = relay.ask(folder, msg, context(config, folder), patience=120)

    # Handled by the worker's ClientApp, mods included: its audit line and error log, as in-process.
    assert reply.has_error() and reply.error.reason == "fingerprint mismatch"
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    [line] = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert line["error"]["category"] == "fingerprint mismatch" and line["round"] == 2
    assert "loaded base model tiny-bert" in processes.log("worker")
    (folder / relay.KEY).write_bytes(b"not the worker's key")
    with pytest.raises(relay.WorkerUnavailable, match="refused or dropped"):
        relay.ask(folder, msg, context(config, folder), patience=5)
    processes.wait_log("worker", "refused a connection", 30)


def stage_message(stage: str, node: int, **records) -> Message:
    """One secure-aggregation stage of round 0 for ``node``: 3 institutions, none tolerated to drop."""
    config = {P.SECAGG_STAGE: stage, P.SECAGG_DROPOUTS: 0, P.SECAGG_COLLUDERS: 0}
    config |= {P.SECAGG_CONTEXT: b"run/round-0", P.SECAGG_THRESHOLD: 2}
    content = RecordDict({P.CONFIG: ConfigRecord(config), **records})
    return Message(content=content, metadata=metadata(0, node))


IDENTITIES = identities((7, 8, 9))


def protocol_only(msg: Message, context: Context) -> Message:
    """The worker's ClientApp reduced to secure_statistics (keys in ``context.state``), which kills
    its own process on the masked input, before anything is released."""
    if msg.content[P.CONFIG][P.SECAGG_STAGE] == P.MASKED_INPUT:
        os.kill(os.getpid(), signal.SIGKILL)
    identity = IDENTITIES[msg.metadata.dst_node_id]
    content = secure_statistics(msg, context.state, "fp", identity, lambda: 1.0, lambda _sharing: None)
    return Message(content=content, reply_to=msg)


def test_a_worker_killed_between_stages_leaves_the_rounds_keys_to_the_next_one(tmp_path, monkeypatch) -> None:
    """Issue 28 in deployment: the round's keys wait between stages in the context the SuperNode keeps
    (the relay takes back the state with the reply), not in the worker, so a worker killed between two
    stages and started again answers the next stage; one killed during a stage fails that message, and
    the SuperNode's state stays that of the last stage answered (nothing of the lost one is kept)."""
    node, peers = 7, (8, 9)
    folder = tmp_path / "w"
    relay.open_folder(folder)
    monkeypatch.setattr(worker, "app", protocol_only)
    fork = multiprocessing.get_context("fork")

    def started() -> multiprocessing.Process:
        proc = fork.Process(target=worker.serve, args=(folder,), daemon=True)
        proc.start()
        return proc

    ctx = context(institution(tmp_path), folder)
    first = started()
    try:
        advert = relay.ask(folder, stage_message(P.ADVERTISE_KEYS, node), ctx, patience=30)
    finally:
        first.kill()
        first.join(10)
    kept = ctx.state.config_records[STATE]
    adverts = {node: parse_advert(advert.content, "fp")}
    adverts |= {
        n: ClientRound(n, for_statistics(None, 0, 0), b"run/round-0", IDENTITIES[n]).advertise_keys(1.0)
        for n in peers
    }
    roster = ArrayRecord(
        {f"{n}/{name}": as_bytes(raw) for n, a in adverts.items() for name, raw in advert_parts(a).items()}
    )
    noises = ConfigRecord({str(n): 1.0 for n in adverts})
    share = stage_message(P.SHARE_KEYS, node, **{P.SECAGG_ROSTER: roster, P.SECAGG_NOISES: noises})

    second = started()  # the daemon's restart: a new process, nothing of the first in memory
    try:
        shares = relay.ask(folder, share, ctx, patience=30)
        assert sorted(parse_shares(shares.content, "fp", 4096)) == sorted(peers)
        after_shares = ctx.state.config_records[STATE]
        before, after = json.loads(bytes(kept[ROUND])), json.loads(bytes(after_shares[ROUND]))
        assert after["stage"] == before["stage"] + 1  # one step on, with the dead worker's keys
        secrets = ("cipher", "mask", "seed")
        assert [after[k] for k in secrets] == [before[k] for k in secrets]
        masked = stage_message(P.MASKED_INPUT, node, **{P.SECAGG_INBOX: ArrayRecord()})
        with pytest.raises(relay.WorkerUnavailable, match="refused or dropped"):
            relay.ask(folder, masked, ctx, patience=30)
    finally:
        second.kill()
        second.join(10)
    assert second.exitcode == -signal.SIGKILL
    assert ctx.state.config_records[STATE] == after_shares  # still at the shares: nothing was masked


@pytest.fixture(autouse=True)
def _no_leftover_cache():
    yield
    shared_data.cache_clear()
