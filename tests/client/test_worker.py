"""The institution's worker and the relay that hands it Flower's messages (client.worker,
client.relay): what is cached is dropped when its files change, and a worker that cannot be reached
fails the message the way any failure does (a fixed category out, the detail and an audit line here).
The whole path through real Flower processes: test_deployment.py."""

from __future__ import annotations

import json
import logging
import stat
import sys
from pathlib import Path

import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedlora.client import relay
from fedlora.client.app import shared_data
from fedlora.client.worker import Freshness
from fedlora.common import protocol as P
from fedlora.common.config import load_config
from fedlora.common.model import build_model, forget_base_models
from helpers.deploy import write_csv
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


@pytest.fixture(autouse=True)
def _no_leftover_cache():
    yield
    shared_data.cache_clear()
