"""What leaves an institution through the real ClientApp (its mods and handlers, tiny-BERT, real
Opacus): a failure only as a fixed category and code, every outgoing message in the audit log, and no
statistic computed on the private data unless the institution opts in."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedlora.client.app import ClientSetup, build_client_app, shared_data
from fedlora.client.failures import FingerprintMismatch, classify
from fedlora.common import protocol as P
from fedlora.common.adapter import adapter_state, to_record
from fedlora.common.errors import (
    AdapterError,
    BudgetExceeded,
    CheckpointError,
    ConfigError,
    DataError,
    ModelError,
    TrainingDiverged,
)
from fedlora.common.model import build_model, lora_scale
from helpers.messages import metadata

LABELS = ("neg", "pos")
TRAIN_KEYS = {P.NUM_EXAMPLES, P.EPSILON, P.LORA_R, P.LORA_SCALE, P.STEPS, P.TRAIN_SECONDS}


def secret_rows(n: int, tag: str) -> list[tuple[str, str]]:
    """Rows no file outside the institution may ever contain (each text is unique and greppable)."""
    return [(f"patient {tag}-{i:03d} zqx reports chest pain", LABELS[i % 2]) for i in range(n)]


def write_rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["text", "label"])
        out.writerows(rows)
    return path


@pytest.fixture
def institution(tmp_path, make_config):
    """``institution(overrides)``: the setup of one institution with its own secret CSVs."""
    train = write_rows(tmp_path / "train.csv", secret_rows(24, "train"))
    held = write_rows(tmp_path / "eval.csv", secret_rows(8, "eval"))

    def make(overrides: dict | None = None, ledger: str = "ledger.json") -> ClientSetup:
        base = {
            "data": {"path": str(train), "eval_path": str(held), "labels": list(LABELS), "max_length": 24},
            "training": {"local_steps": 2, "batch_size": 8},
            "privacy": {"epsilon": 50, "planned_rounds": 2},
        }
        for section, values in (overrides or {}).items():
            base[section] = {**base.get(section, {}), **values}
        return ClientSetup(
            cfg=make_config(base),
            client_id=0,
            ledger_path=tmp_path / ledger,
            audit_path=tmp_path / "audit.jsonl",
        )

    return make


def server_message(setup: ClientSetup, kind: str = "train", server_round: int = 1, **config) -> Message:
    """What the coordinator sends: the initial global adapter at its rank, for this client's layout."""
    cfg = setup.cfg
    tokenizer, bundle = shared_data(cfg)
    built = build_model(cfg.model, bundle.labels, len(tokenizer))
    record = {
        P.FINGERPRINT: built.fingerprint,
        P.LORA_R: cfg.model.lora_r,
        P.LORA_SCALE: lora_scale(cfg.model),
        P.ROUND: server_round,
        **config,
    }
    content = RecordDict({P.ARRAYS: to_record(adapter_state(built.model)), P.CONFIG: ConfigRecord(record)})
    meta = metadata(0, 1)
    meta.message_type = kind
    return Message(content=content, metadata=meta)


def empty_message() -> Message:
    return Message(content=RecordDict(), metadata=metadata(0, 1))


def send(setup: ClientSetup, msg: Message) -> Message:
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return build_client_app(lambda _context: setup)(msg, context)


def audit(setup: ClientSetup) -> list[dict]:
    return [json.loads(line) for line in setup.audit_path.open()]


def all_rows(tmp: Path) -> list[str]:
    return [row[0] for name in ("train.csv", "eval.csv") for row in list(csv.reader((tmp / name).open()))[1:]]


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [
        (FingerprintMismatch("f"), 105, "fingerprint mismatch"),
        (TrainingDiverged("nan"), 107, "training diverged"),
        (BudgetExceeded("b"), 106, "budget exhausted"),
        (ConfigError("c"), 101, "config error"),
        (DataError("patient text"), 102, "data error"),
        (ModelError("m"), 103, "model error"),
        (AdapterError("a"), 104, "adapter error"),
        (CheckpointError("ledger"), 108, "ledger error"),
        (KeyError("patient text"), 100, "internal error"),
    ],
)
def test_each_error_class_has_one_fixed_category(error, code, reason) -> None:
    assert classify(error) == (code, reason)


def test_a_label_error_tells_the_coordinator_data_error_and_keeps_the_row_local(institution) -> None:
    """data.label_column pointed at the text column: the data error quotes a patient's sentence."""
    setup = institution({"data": {"label_column": "text"}})
    with pytest.raises(DataError, match="zqx"):
        shared_data(setup.cfg)
    reply = send(setup, empty_message())

    assert reply.has_error()
    assert (reply.error.code, reply.error.reason) == (102, "data error")
    line = audit(setup)[-1]
    assert line["error"] == {"code": 102, "category": "data error"}
    assert "zqx" not in json.dumps(line)
    local = setup.error_log.read_text()
    assert "data error" in local and "zqx" in local and "Traceback" in local


@pytest.mark.slow
def test_every_error_path_leaves_as_a_fixed_reason_and_is_audited(institution, tmp_path) -> None:
    """Fingerprint, budget, divergence, a malformed message, a missing column: each reply carries only
    its category, each is one audit line, and no byte of any row's text is in either."""
    good = institution()
    diverging = institution({"model": {"lora_alpha": 1e38}}, ledger="diverging.json")
    budget = institution({"privacy": {"planned_rounds": 1}}, ledger="budget.json")
    # Its first round is audited apart: the shared log's ledgers must cover what it proves sent.
    first = dataclasses.replace(budget, audit_path=tmp_path / "budget-audit.jsonl")
    assert not send(first, server_message(budget, server_round=1)).has_error()
    cases = [
        (good, server_message(good, **{P.FINGERPRINT: "f00"}), "fingerprint mismatch", "does not match"),
        (good, empty_message(), "internal error", "KeyError"),  # no config record
        (institution({"data": {"text_column": "notes"}}), server_message(good), "data error", "'notes'"),
        (diverging, server_message(diverging), "training diverged", "not finite"),
        (budget, server_message(budget, server_round=2), "budget exhausted", "would reach"),
    ]
    for setup, msg, reason, _ in cases:
        reply = send(setup, msg)
        assert reply.has_error() and reply.error.reason == reason, reply
    lines = [line for line in audit(good) if "error" in line]
    assert [line["error"]["category"] for line in lines] == [reason for _, _, reason, _ in cases]
    text = json.dumps(lines)
    assert not any(row in text for row in all_rows(tmp_path))
    local = good.error_log.read_text()
    assert all(detail in local for _, _, _, detail in cases)


@pytest.mark.slow
def test_a_non_finite_adapter_is_never_sent(institution) -> None:
    setup = institution({"model": {"lora_alpha": 1e38}})
    reply = send(setup, server_message(setup))
    assert reply.has_error() and reply.error.reason == "training diverged"
    assert "arrays" not in audit(setup)[-1]
    assert "adapter tensors are not finite" in setup.error_log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("release", [False, True])
def test_statistics_of_the_private_data_leave_only_on_opt_in(institution, release) -> None:
    setup = institution({"privacy": {"release_metrics": release}})
    trained = send(setup, server_message(setup))
    evaluated = send(setup, server_message(setup, kind="evaluate"))
    train_metrics, eval_metrics = (dict(m.content[P.METRICS]) for m in (trained, evaluated))

    extra = {P.LOSS} if release else set()
    assert set(train_metrics) == TRAIN_KEYS | extra
    recalls = {k for k in eval_metrics if k.startswith(P.RECALL)}
    released = {P.LOSS, P.ACCURACY, P.MACRO_F1} | recalls
    assert set(eval_metrics) == {P.NUM_EXAMPLES} | (released if release else set())
    assert bool(recalls) == release
    logged = [set(line["metrics"]["metrics"]) for line in audit(setup)]
    assert logged == [set(train_metrics), set(eval_metrics)]
    assert torch.isfinite(torch.tensor(list(train_metrics.values()))).all()


@pytest.mark.slow
def test_a_reply_the_audit_log_cannot_record_does_not_leave(institution) -> None:
    setup = institution()
    setup.audit_path.mkdir()  # a folder where the audit file should be: appending fails
    reply = send(setup, server_message(setup, kind="evaluate"))
    assert reply.has_error() and (reply.error.code, reply.error.reason) == (100, "internal error")


def tampered(kind: str) -> tuple[str, RecordDict]:
    """A reply some future code path might build: an honest codec reply plus something more."""
    from flwr.app import ArrayRecord, MetricRecord

    from fedlora.common.codec import TrainMetrics, train_reply

    content = train_reply({"w": torch.zeros(2)}, TrainMetrics(10, 0.5, 4, 4.0, 2, 1.0), "fp")
    if kind == "honest":
        return "train", content
    if kind == "per-example-gradients":
        content["gradients"] = ArrayRecord({"w": torch.ones(10, 2)})
    elif kind == "extra-metric":
        content[P.METRICS] = MetricRecord({**dict(content[P.METRICS]), "mean-label": 0.4})
    elif kind == "unknown-type":
        return "query", content
    return "train", content


@pytest.mark.parametrize("kind", ["honest", "per-example-gradients", "extra-metric", "unknown-type"])
def test_only_what_the_codec_builds_leaves(tmp_path, kind) -> None:
    """The audit mod is the gate: a reply that is not exactly a codec reply never leaves, whatever
    code path built it; an error reply goes instead, and the audit log says so."""
    from fedlora.client.audit import audit_mod

    message_type, content = tampered(kind)
    meta = metadata(0, 1)
    meta.message_type = message_type
    msg = Message(content=RecordDict(), metadata=meta)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    log = tmp_path / "audit.jsonl"
    reply = audit_mod(lambda _context: log)(msg, context, lambda m, _c: Message(content=content, reply_to=m))
    line = json.loads(log.read_text())
    if kind == "honest":
        assert not reply.has_error() and "error" not in line
    else:
        assert reply.has_error() and (reply.error.code, reply.error.reason) == (104, "adapter error")
        assert line["error"] == {"code": 104, "category": "adapter error"}
