"""Over real TLS (flower-superlink, two fedlora-client SuperNodes with their workers, loopback): an
institution whose ledger file is deleted between rounds (a container without a volume) refuses the
next round as a ledger error instead of training on a budget restarted from zero; the other trains.
Before issue 26 the institution trained round 2 on a fresh ledger."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers.deploy import free_port, make_federation, wait_for

pytestmark = pytest.mark.integration


def train_lines(audit: object) -> dict[int, dict]:
    if not audit.exists():
        return {}
    lines = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    return {line["round"]: line for line in lines if line["type"] == "train"}


def test_a_ledger_deleted_between_rounds_is_refused_over_tls(tmp_path, processes) -> None:
    fed = make_federation(
        tmp_path, {"rounds": 2, "min_clients": 2, "round_timeout": 120, "node_wait_timeout": 180}
    )
    for config in fed.institutions.values():
        data = yaml.safe_load(config.read_text())
        data["privacy"]["audit_log"] = "audit.jsonl"
        config.write_text(yaml.safe_dump(data))
    audit = tmp_path / "a" / "audit.jsonl"
    processes.start("server", fed.server_cmd())
    processes.wait_log("server", "submitted", 120)
    for name in ("a", "b"):
        processes.start(name, fed.client_cmd(name, "--runtime-port", str(free_port())))

    # a's round-1 update has left (its audit line is written first); round 2 cannot start before
    # round 1 is aggregated, so the ledger is lost between a's two rounds.
    wait_for(lambda: 1 in train_lines(audit), 300, "a's round 1 sent", processes.tails)
    fed.ledger("a").unlink()

    assert processes.wait("server", 400) == 0, processes.tails()
    history = [e for e in json.loads((fed.run_dir / "history.json").read_text()) if e["round"]]
    assert [len(e["clients"]) for e in history] == [2, 1]
    assert [d["reason"] for d in history[1]["dropped"]] == ["ledger error"]
    lines = train_lines(audit)
    assert "error" not in lines[1] and lines[2]["error"] == {"code": 108, "category": "ledger error"}
    assert not fed.ledger("a").exists()
    refusal = (tmp_path / "a" / "audit-errors.log").read_text()
    assert "refusing to train" in refusal and str(fed.ledger("a")) in refusal
    assert processes.terminate("a", 60) == 0 and processes.terminate("b", 60) == 0
