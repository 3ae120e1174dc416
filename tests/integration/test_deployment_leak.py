"""A real deployment on 127.0.0.1 (SuperLink, SuperNodes, ClientApp processes, TLS): an institution
whose label column is its text column fails, and none of its text reaches the coordinator: not its
history, checkpoint, adapter, SuperLink database, serverapp.log or console."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from helpers.deploy import free_port, make_federation

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def texts(data: Path) -> list[str]:
    return [row[0] for row in list(csv.reader(data.open()))[1:]]


def test_a_label_error_reaches_the_coordinator_as_data_error_only(tmp_path, processes) -> None:
    fed = make_federation(
        tmp_path, {"rounds": 1, "min_clients": 2, "round_timeout": 120, "node_wait_timeout": 180}
    )
    config = yaml.safe_load(fed.institutions["a"].read_text())
    config["data"]["label_column"] = "text"
    fed.institutions["a"].write_text(yaml.safe_dump(config))
    processes.start("server", fed.server_cmd())
    processes.wait_log("server", "submitted", 120)
    for name in ("a", "b"):
        processes.start(name, fed.client_cmd(name, "--runtime-port", str(free_port())))
    assert processes.wait("server", 360) == 0, processes.tails()

    history = [e for e in json.loads((fed.run_dir / "history.json").read_text()) if e["round"]]
    assert [d["reason"] for d in history[0]["dropped"]] == ["data error"]
    assert len(history[0]["clients"]) == 1
    secrets = [t.encode() for t in texts(fed.root / "a" / "data.csv")]
    coordinator = [p for p in fed.run_dir.rglob("*") if p.is_file()] + [processes.log_path("server")]
    assert any(p.name == "serverapp.log" for p in coordinator)
    assert any(p.name.startswith("state.db") for p in coordinator)
    leaking = {str(p) for p in coordinator for s in secrets if s in p.read_bytes()}
    assert not leaking
    local = (fed.root / "a" / "ledger-errors.log").read_text()
    assert "data error" in local and texts(fed.root / "a" / "data.csv")[0] in local
    for name in ("a", "b"):
        assert processes.terminate(name, 60) == 0
