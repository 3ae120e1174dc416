"""A lost ledger never resets a budget: the real ClientApp (its mods, tiny-BERT, real Opacus) trains
two rounds of a budget planned for three, the ledger is then lost as an operator loses it, and the
third round is refused as a ledger error, naming the ledger and the audit log, with nothing charged
or trained. Before issue 26 the third round (and more) trained on a budget restarted from zero."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

from fedlora.client.app import ClientSetup, build_client_app
from fedlora.client.audit import released
from fedlora.client.ledger import PrivacyLedger
from fedlora.client.privacy_audit import run_local_audit
from fedlora.common import protocol as P
from fedlora.common.errors import CheckpointError
from helpers.messages import train_message

LABELS = ("neg", "pos")


@pytest.fixture
def institution(tmp_path, make_config) -> ClientSetup:
    """One institution with 32 rows, a budget planned for 3 rounds of 2 steps, a ledger and an audit log."""
    train = tmp_path / "train.csv"
    with train.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["text", "label"])
        out.writerows((f"note {i} about case {i % 5}", LABELS[i % 2]) for i in range(32))
    cfg = make_config(
        {
            "data": {"path": str(train), "labels": list(LABELS), "max_length": 16},
            "training": {"local_steps": 2, "batch_size": 8},
            "privacy": {"epsilon": 8, "planned_rounds": 3},
        }
    )
    ledger, audit = tmp_path / "ledger.json", tmp_path / "audit.jsonl"
    return ClientSetup(cfg=cfg, client_id=0, ledger_path=ledger, audit_path=audit)


def train(setup: ClientSetup, server_round: int) -> Message:
    """The coordinator's train message for ``server_round``, through the whole ClientApp."""
    msg = train_message(setup.cfg, server_round)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return build_client_app(lambda _context: setup)(msg, context)


def lose(ledger: Path, how: str, backup: Path) -> None:
    """The ways a ledger is lost: a moved relative path or a container without a volume (deleted), a
    hand edit (entries cleared, steps zeroed), a restore from an older backup."""
    if how == "deleted":
        ledger.unlink()
        return
    if how == "older backup":
        shutil.copy(backup, ledger)
        return
    data = json.loads(ledger.read_text())
    if how == "cleared":
        data["entries"] = []
    else:
        for entry in data["entries"]:
            entry["steps"] = 0
    ledger.write_text(json.dumps(data))


@pytest.mark.parametrize("how", ["deleted", "cleared", "steps zeroed", "older backup"])
def test_a_lost_ledger_is_refused_and_the_budget_not_reset(institution, how, tmp_path) -> None:
    backup = tmp_path / "backup.json"
    for server_round in (1, 2):
        reply = train(institution, server_round)
        assert not reply.has_error(), reply.error if reply.has_error() else None
        if server_round == 1:
            shutil.copy(institution.ledger_path, backup)
    reported = reply.content[P.METRICS][P.EPSILON]
    assert released(institution.audit_path).epsilon == reported > 0

    lose(institution.ledger_path, how, backup)
    before = institution.ledger_path.read_bytes() if institution.ledger_path.exists() else None
    reply = train(institution, 3)

    assert reply.has_error()
    assert (reply.error.code, reply.error.reason) == (108, "ledger error")
    after = institution.ledger_path.read_bytes() if institution.ledger_path.exists() else None
    assert after == before, "nothing may be charged on a lost ledger"
    detail = [line for line in institution.error_log.read_text().splitlines() if "refusing to train" in line]
    assert detail and str(institution.ledger_path) in detail[-1]
    assert "restore" in detail[-1] and "privacy.ledger_path" in detail[-1]
    # The third round left only as an error: the audit log still proves two rounds and their epsilon.
    assert sorted(released(institution.audit_path).steps) == [1, 2]


def test_an_intact_ledger_trains_the_planned_rounds(institution) -> None:
    """The check refuses only a ledger that lost something: the planned rounds all train."""
    for server_round in (1, 2, 3):
        reply = train(institution, server_round)
        assert not reply.has_error(), reply.error if reply.has_error() else None
    ledger = PrivacyLedger.from_config(institution.cfg.privacy, institution.ledger_path)
    assert ledger.spent == pytest.approx(released(institution.audit_path).epsilon)
    assert ledger.spent <= 8


def test_the_check_runs_in_the_ledger_itself_in_one_line(institution, tmp_path) -> None:
    """train-local and the audit reserve through the same ledger: a ledger that lost its file is
    refused there too, before anything is written."""
    for server_round in (1, 2):
        assert not train(institution, server_round).has_error()
    institution.ledger_path.unlink()
    privacy = institution.cfg.privacy
    ledger = PrivacyLedger.from_config(privacy, institution.ledger_path, institution.audit_path)
    ledger.noise_multiplier = 1.0
    with pytest.raises(CheckpointError) as err:
        ledger.reserve(3, 0.25, 2)
    message = str(err.value)
    assert "\n" not in message and str(institution.audit_path) in message and "epsilon 0.000" in message
    assert not institution.ledger_path.exists()


def test_a_torn_last_audit_line_is_a_reply_that_never_left_but_a_bad_line_is_refused(tmp_path) -> None:
    log = tmp_path / "audit.jsonl"
    good = {"type": "train", "round": 1, "metrics": {P.METRICS: {P.EPSILON: 1.5, P.STEPS: 2}}}
    log.write_text(json.dumps(good) + "\n" + json.dumps(good)[:20])
    assert released(log).steps == {1: 2} and released(log).epsilon == 1.5
    log.write_text("not json\n" + json.dumps(good) + "\n")
    with pytest.raises(CheckpointError, match=rf"{log}:1: not an audit line"):
        released(log)


def test_the_local_privacy_audit_keeps_its_own_ledger_apart_from_the_audit_log(institution, tmp_path) -> None:
    """`fedlora-client audit` trains against a ledger of its own and sends nothing: the institution's
    audit log (what its federation rounds released) is not that ledger's record, and must not make
    the audit refuse."""
    for server_round in (1, 2):
        assert not train(institution, server_round).has_error()
    cfg = institution.cfg
    privacy = dataclasses.replace(cfg.privacy, audit_log=str(institution.audit_path))
    cfg = dataclasses.replace(cfg, privacy=privacy, federation=dataclasses.replace(cfg.federation, rounds=1))
    result = run_local_audit(cfg, tmp_path / "audit", 10, 0)
    assert 0 < result.claimed_epsilon <= 8
