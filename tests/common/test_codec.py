"""The message codec: what the ClientApp builds round-trips, and every malformation is refused by name."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlora.common import protocol as P
from fedlora.common.codec import (
    EvaluateMetrics,
    ReplyRules,
    TrainMetrics,
    check_outgoing,
    evaluate_reply,
    parse_evaluate_reply,
    parse_train_reply,
    train_reply,
)
from fedlora.common.errors import AdapterError

FP = "f1ngerpr1nt"
A, B, HEAD = "l0.q.lora_A.weight", "l0.q.lora_B.weight", "classifier.weight"
RULES = ReplyRules(FP, {A: (None, 6), B: (5, None), HEAD: (3, 5)}, ranks=(1, 8), scales=(0.5, 8.0))
METRICS = TrainMetrics(
    num_examples=40, epsilon=0.7, lora_r=4, lora_scale=4.0, steps=3, train_seconds=1.5, loss=0.9
)


def update(rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return {k: torch.randn(s, generator=g) for k, s in {A: (rank, 6), B: (5, rank), HEAD: (3, 5)}.items()}


def npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_train_reply_round_trips(dtype: str) -> None:
    sent = update()
    parsed = parse_train_reply(train_reply(sent, METRICS, FP, dtype), RULES)
    assert parsed.metrics == METRICS and parsed.fingerprint == FP
    wire = torch.float16 if dtype == "fp16" else torch.float32
    for key, tensor in sent.items():
        assert parsed.update[key].dtype == torch.float32
        assert torch.equal(parsed.update[key], tensor.to(wire).to(torch.float32))


def test_train_reply_is_what_the_client_app_sent() -> None:
    """Drop-in for client.app.handle_train's reply: the same records and metric keys."""
    content = train_reply(update(), METRICS, FP)
    assert sorted(content) == sorted([P.ARRAYS, P.METRICS, P.CONFIG])
    assert set(content[P.METRICS]) == {*P.TRAIN_REQUIRED, P.LOSS}
    assert dict(content[P.CONFIG]) == {P.FINGERPRINT: FP}


def test_loss_is_optional_and_a_nan_loss_is_not_sent() -> None:
    for loss in (None, float("nan")):
        metrics = TrainMetrics(**{**METRICS.__dict__, "loss": loss})
        content = train_reply(update(), metrics, FP)
        assert P.LOSS not in content[P.METRICS]
        assert parse_train_reply(content, RULES).metrics.loss is None


def test_an_empty_update_says_its_plan_trains_nothing_after_round_0() -> None:
    """The reason the coordinator stops a federation on (server.app.end_if_nothing_trains): it
    round-trips, the audit mod lets it leave, and only a reply of no steps may claim it."""
    empty = TrainMetrics(**{**METRICS.__dict__, "steps": 0, "loss": None})
    zero = {k: torch.zeros_like(v) for k, v in update().items()}
    content = train_reply(zero, empty, FP, plan=P.STATISTICS_ONLY)
    assert dict(content[P.CONFIG]) == {P.FINGERPRINT: FP, P.PLAN: P.STATISTICS_ONLY}
    check_outgoing(content, "train")
    assert parse_train_reply(content, RULES).plan == P.STATISTICS_ONLY
    assert parse_train_reply(train_reply(zero, empty, FP), RULES).plan is None
    with pytest.raises(AdapterError, match=r"'fedlora-plan': 'statistics-only' on a reply of 3 steps"):
        train_reply(update(), METRICS, FP, plan=P.STATISTICS_ONLY)
    claimed = with_records(**{P.CONFIG: ConfigRecord({P.FINGERPRINT: FP, P.PLAN: P.STATISTICS_ONLY})})
    with pytest.raises(AdapterError, match="on a reply of 3 steps"):
        parse_train_reply(claimed, RULES)
    other = ConfigRecord({P.FINGERPRINT: FP, P.PLAN: "tired"})
    with pytest.raises(AdapterError, match=r"'fedlora-plan': 'tired', expected 'statistics-only'"):
        parse_train_reply(with_records(**{P.METRICS: MetricRecord(empty.values()), P.CONFIG: other}), RULES)


def test_evaluate_reply_round_trips_with_and_without_statistics() -> None:
    for metrics in (EvaluateMetrics(12), EvaluateMetrics(12, loss=0.4, accuracy=0.75)):
        assert parse_evaluate_reply(evaluate_reply(metrics)) == metrics


def test_build_refuses_what_the_coordinator_would() -> None:
    bad = {**update(), HEAD: torch.full((3, 5), float("inf"))}
    with pytest.raises(AdapterError, match=r"classifier\.weight.*non-finite.*nothing is sent"):
        train_reply(bad, METRICS, FP)
    with pytest.raises(AdapterError, match="'num-examples': 0"):
        train_reply(update(), TrainMetrics(**{**METRICS.__dict__, "num_examples": 0}), FP)
    with pytest.raises(AdapterError, match=r"'accuracy': 1\.5"):
        evaluate_reply(EvaluateMetrics(3, accuracy=1.5))


def with_records(**changes) -> RecordDict:
    content = train_reply(update(), METRICS, FP)
    records = {name: content[name] for name in content}
    records.update(changes)
    return RecordDict({k: v for k, v in records.items() if v is not None})


def with_metrics(**values) -> RecordDict:
    metrics = {k: v for k, v in {**METRICS.values(), **values}.items() if v is not None}
    return with_records(**{P.METRICS: MetricRecord(metrics)})


def with_array(key: str, array: Array) -> RecordDict:
    arrays = dict(train_reply(update(), METRICS, FP)[P.ARRAYS].items())
    arrays[key] = array
    return with_records(**{P.ARRAYS: ArrayRecord(arrays)})


HUGE = Array(dtype="float32", shape=(10**9, 6), stype="numpy.ndarray", data=npy(np.zeros((4, 6), np.float32)))
LYING = Array(
    dtype="float32", shape=(4, 6), stype="numpy.ndarray", data=npy(np.zeros((4, 6), np.float32))[:-4]
)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (lambda: with_records(second=ArrayRecord(update())), "records"),
        (lambda: with_records(more=MetricRecord({P.NUM_EXAMPLES: 3})), "records"),
        (lambda: with_records(**{P.CONFIG: None}), "records"),
        (lambda: with_records(**{P.METRICS: ConfigRecord(METRICS.values())}), "expected MetricRecord"),
        (lambda: with_records(**{P.CONFIG: ConfigRecord({P.FINGERPRINT: FP, "x": 1})}), "config record"),
        (lambda: with_records(**{P.CONFIG: ConfigRecord({P.FINGERPRINT: "other"})}), "fingerprint"),
        (lambda: with_metrics(extra=1.0), "unexpected metric 'extra'"),
        (lambda: with_metrics(**{P.STEPS: None}), "metric 'steps' missing"),
        (lambda: with_metrics(**{P.LOSS: [0.1, 0.2]}), "'loss'.*single number"),
        (lambda: with_metrics(**{P.NUM_EXAMPLES: 0.5}), "'num-examples': 0.5, expected >= 1"),
        (lambda: with_metrics(**{P.NUM_EXAMPLES: float("inf")}), "'num-examples'.*finite"),
        (lambda: with_metrics(**{P.EPSILON: -1.0}), "'epsilon'"),
        (lambda: with_metrics(**{P.LORA_R: 4.0}), "'lora-r': 4.0, expected an integer"),
        (lambda: with_metrics(**{P.LORA_R: 10**9}), "'lora-r': 1e\\+09, the coordinator allows 1 to 8"),
        (lambda: with_metrics(**{P.LORA_SCALE: 1e6}), "'lora-scale'.*allows 0.5 to 8"),
        (lambda: with_metrics(**{P.LORA_SCALE: 1e-30}), "'lora-scale'"),
        (lambda: with_metrics(**{P.LORA_SCALE: 0.0}), "'lora-scale'"),
        (lambda: with_array("extra", Array(np.zeros(2, np.float32))), "unexpected key 'extra'"),
        (lambda: with_records(**{P.ARRAYS: ArrayRecord({A: update()[A]})}), "missing key"),
        (lambda: with_array(A, Array(np.zeros((4, 6), np.float64))), "dtype 'float64'"),
        (lambda: with_array(A, Array(np.zeros((4, 6), np.int32))), "dtype 'int32'"),
        (lambda: with_array(A, Array(np.zeros((4, 7), np.float32))), r"shape \(4, 7\), expected \(4, 6\)"),
        (lambda: with_array(A, HUGE), r"shape \(1000000000, 6\)"),
        (lambda: with_array(A, LYING), "payload bytes"),
        (lambda: with_array(A, Array(np.full((4, 6), np.nan, np.float32))), "non-finite"),
    ],
)
def test_malformed_train_reply_is_refused_by_name(content, reason: str) -> None:
    with pytest.raises(AdapterError, match=reason):
        parse_train_reply(content(), RULES)


def test_a_payload_whose_header_disagrees_with_its_metadata_is_refused_before_decoding() -> None:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 6)}
    )
    data = buffer.getvalue() + np.zeros((4, 6), np.float32).tobytes()
    forged = Array(dtype="float32", shape=(4, 6), stype="numpy.ndarray", data=data)
    with pytest.raises(AdapterError, match=r"payload holds float32 \(1000000000, 6\)"):
        parse_train_reply(with_array(A, forged), RULES)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: 3, "extra": 1.0})}), "unexpected metric"),
        (RecordDict({P.METRICS: MetricRecord({P.LOSS: 0.3})}), "'num-examples' missing"),
        (RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: [3, 4]})}), "single number"),
        (
            RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: 3}), "m2": MetricRecord({P.LOSS: 1.0})}),
            "records",
        ),
        (RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: 3, P.LOSS: float("nan")})}), "finite"),
    ],
)
def test_malformed_evaluate_reply_is_refused_by_name(record: RecordDict, reason: str) -> None:
    with pytest.raises(AdapterError, match=reason):
        parse_evaluate_reply(record)



LONG = "k" * 4_000_000


@pytest.mark.parametrize(
    "content",
    [
        lambda: with_metrics(**{LONG: 1.0}),
        lambda: train_reply(update(), METRICS, LONG),
        lambda: with_array(LONG, Array(np.zeros(2, np.float32))),
        lambda: with_records(**{LONG: ConfigRecord({"a": 1})}),
        lambda: with_records(**{P.CONFIG: ConfigRecord({P.FINGERPRINT: FP, LONG: 1})}),
    ],
    ids=["metric-key", "fingerprint", "array-key", "record-name", "config-key"],
)
def test_a_refusal_quotes_at_most_a_short_piece_of_a_clients_string(content) -> None:
    """Issue 26: a 4 MB key was quoted whole in the refusal, then in the coordinator's log, history
    and every checkpoint."""
    with pytest.raises(AdapterError) as err:
        parse_train_reply(content(), RULES)
    assert "kkkk" in str(err.value) and len(str(err.value)) < 250, len(str(err.value))
