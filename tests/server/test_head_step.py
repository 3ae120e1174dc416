"""Head rounds at the coordinator: the step from the summed head-gradient replies (by hand), a
malformed reply dropped without the round, replies before round 0 counted no rows; and with no noise
on a separable set whose class means misplace the boundary, head rounds beat the statistics head."""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from fedlora.client.head_rounds import clipped_gradient_sum
from fedlora.common import protocol as P
from fedlora.common.adapter import from_record
from fedlora.common.codec import HeadMetrics, check_outgoing, head_gradient_reply, parse_head_gradient_reply
from fedlora.common.config import load_config
from fedlora.common.head_gradient import CLIP, LEARNING_RATE, length
from fedlora.server.head_step import SecureHead, head_step, rows_in_sum, summed_gradient
from fedlora.server.history import RoundLog, summarise_round
from fedlora.server.statistics_head import class_mean_head
from fedlora.server.strategy import build_strategy
from helpers.messages import reply_message

FP = "f1ngerpr1nt"
A = "base_model.model.l0.q.lora_A.weight"
LB = "base_model.model.l0.q.lora_B.weight"
W = "base_model.model.classifier.modules_to_save.default.weight"
B = "base_model.model.classifier.modules_to_save.default.bias"
CLASSES, WIDTH = 3, 5
VALUES = length(CLASSES, WIDTH)


def adapter() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        A: torch.randn(4, 6, generator=g),
        LB: torch.zeros(5, 4),
        W: torch.randn(CLASSES, WIDTH, generator=g),
        B: torch.zeros(CLASSES),
    }


def strategy_after_round_0(released_rows: float, institutions: int):
    """A coordinator whose round 0 summed ``released_rows`` rows of ``institutions`` institutions."""
    s = build_strategy(
        load_config(overrides=["model.lora_r=4", "federation.min_clients=2"]), FP, num_clients=3
    )
    start = adapter()
    s.set_global(ArrayRecord({k: v.contiguous() for k, v in start.items()}))
    counts = torch.full((CLASSES,), released_rows / CLASSES, dtype=torch.float64)
    arrays = s.statistics_head(
        torch.randn(CLASSES, WIDTH, dtype=torch.float64), counts, 0.0, 20.0, institutions
    )
    s.set_global(arrays)
    s.sent = {k: a.numpy() for k, a in arrays.items()}
    return s


def head_reply(node: int, vector: torch.Tensor, epsilon: float = 1.0):
    metrics = HeadMetrics(epsilon=epsilon, steps=1, train_seconds=0.1, noise_std=2.0)
    return reply_message(node, head_gradient_reply(vector, metrics, FP))


def raw_head_reply(node: int, vector: np.ndarray) -> object:
    """A head reply built by hand, past the codec's own checks (what a hostile client can send)."""
    metrics = {P.EPSILON: 1.0, P.STEPS: 1, P.TRAIN_SECONDS: 0.1, P.NOISE_STD: 2.0}
    content = RecordDict(
        {
            P.ARRAYS: ArrayRecord({P.HEAD_GRADIENT: Array(vector)}),
            P.METRICS: MetricRecord(metrics),
            P.CONFIG: ConfigRecord({P.FINGERPRINT: FP, P.STAGE: P.HEAD_GRADIENT}),
        }
    )
    return reply_message(node, content)


def by_hand(s, vectors: list[torch.Tensor], rows: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step at LEARNING_RATE on the mean gradient, written out for this test."""
    start = s.global_adapter.state
    mean = sum(v.double() for v in vectors) / rows
    weight = start[W].double() - LEARNING_RATE * mean[: CLASSES * WIDTH].reshape(CLASSES, WIDTH)
    bias = start[B].double() - LEARNING_RATE * mean[CLASSES * WIDTH :]
    return weight.float(), bias.float()


def test_the_step_from_the_summed_replies_equals_a_hand_computation():
    s = strategy_after_round_0(300.0, 3)
    assert s.released == (300.0, 3)
    g = torch.Generator().manual_seed(1)
    vectors = [torch.randn(VALUES, generator=g) for _ in range(3)]
    weight, bias = by_hand(s, vectors, 300.0)
    start = s.global_adapter.state
    arrays, metrics = s.aggregate_train(1, [head_reply(n, v) for n, v in enumerate(vectors, start=1)])
    got = from_record(arrays)
    assert torch.allclose(got[W], weight, atol=1e-6) and torch.allclose(got[B], bias, atol=1e-6)
    assert torch.equal(got[A], start[A])  # LoRA is not trained
    assert metrics[P.EPSILON] == 1.0
    assert s.rounds[-1].head_gradients == 3
    entry = {"round": 1, "clients": s.rounds[-1].clients, "head_gradients": 3}
    assert "3 head rounds" in summarise_round(entry).line(5)
    # Two of the three round-0 institutions reply: their sum stands for two thirds of the rows.
    s = strategy_after_round_0(300.0, 3)
    arrays, _ = s.aggregate_train(2, [head_reply(n, v) for n, v in enumerate(vectors[:2], start=1)])
    weight, bias = by_hand(s, vectors[:2], 200.0)
    assert torch.allclose(from_record(arrays)[W], weight, atol=1e-6)
    # The helper the benchmark calls is the same step.
    again = head_step(
        s.global_adapter.state[W],
        s.global_adapter.state[B],
        summed_gradient(vectors[:2]),
        rows_in_sum(300.0, 3, 2),
        LEARNING_RATE,
    )
    assert torch.allclose(again[0], weight, atol=1e-6)


def test_a_malformed_head_reply_is_dropped_not_the_round():
    s = strategy_after_round_0(300.0, 3)
    good = torch.randn(VALUES, generator=torch.Generator().manual_seed(2))
    nan = good.numpy().copy()
    nan[3] = np.nan
    replies = [
        head_reply(1, good),
        raw_head_reply(2, nan),
        raw_head_reply(3, np.zeros(VALUES + 1, dtype=np.float32)),
        raw_head_reply(4, np.zeros(VALUES, dtype=np.float64)),
    ]
    arrays, _ = s.aggregate_train(1, replies)
    weight, _ = by_hand(s, [good], rows_in_sum(300.0, 3, 1))
    assert torch.allclose(from_record(arrays)[W], weight, atol=1e-6)
    reasons = {d["node"]: d["reason"] for d in s.rounds[-1].dropped}
    assert set(reasons) == {2, 3, 4}
    assert "non-finite" in reasons[2] and "shape" in reasons[3] and "dtype" in reasons[4]


def test_head_replies_before_any_round_0_count_no_rows_and_are_dropped():
    s = build_strategy(
        load_config(overrides=["model.lora_r=4", "federation.min_clients=2"]), FP, num_clients=3
    )
    s.set_global(ArrayRecord({k: v.contiguous() for k, v in adapter().items()}))
    arrays, _ = s.aggregate_train(1, [head_reply(1, torch.zeros(VALUES))])
    assert arrays is None
    assert "no round-0 statistics" in s.rounds[-1].dropped[0]["reason"]


def test_the_released_rows_survive_a_checkpoint():
    s = strategy_after_round_0(120.0, 4)
    other = build_strategy(
        load_config(overrides=["model.lora_r=4", "federation.min_clients=2"]), FP, num_clients=3
    )
    other.load_state_tensors(s.state_tensors())
    assert other.released == (120.0, 4)


def test_without_noise_head_rounds_beat_the_statistics_head_on_a_separable_set():
    """Unit features at angles 0-80 degrees (class 0) and 90-100 (class 1), 100 rows each: separable at
    85 degrees, but the class means' bisector lies near 67 degrees, so the nearest-class-mean head
    misclassifies 7% of the rows. Ten head rounds without noise separate them all."""
    gen = torch.Generator().manual_seed(0)
    angles = torch.cat([80 * torch.rand(100, generator=gen), 90 + 10 * torch.rand(100, generator=gen)])
    radians = angles * math.pi / 180
    x = torch.zeros(200, 4)
    x[:, 0], x[:, 1] = torch.cos(radians), torch.sin(radians)
    y = torch.tensor([0] * 100 + [1] * 100)
    sums = torch.stack([nn.functional.normalize(x, dim=-1)[y == c].sum(0) for c in (0, 1)]).double()
    weight, bias = class_mean_head(sums, torch.tensor([100.0, 100.0]), 20.0)

    def accuracy(w: torch.Tensor, b: torch.Tensor) -> float:
        return float(((x @ w.T + b).argmax(1) == y).float().mean())

    before = accuracy(weight, bias)
    halves = [(x[::2], y[::2]), (x[1::2], y[1::2])]  # two institutions
    for _ in range(10):
        total = summed_gradient([clipped_gradient_sum(xi, yi, weight, bias, CLIP) for xi, yi in halves])
        weight, bias = head_step(weight, bias, total, rows_in_sum(200.0, 2, 2), LEARNING_RATE)
    assert before <= 0.95
    assert accuracy(weight, bias) == 1.0


def test_a_head_reply_round_trips_through_the_codec_and_leaves_the_audit_mod():
    vector = torch.arange(VALUES, dtype=torch.float32)
    content = head_gradient_reply(vector, HeadMetrics(1.0, 1, 0.1, 2.0), FP)
    check_outgoing(content, "train")
    parsed = parse_head_gradient_reply(content, FP, VALUES)
    assert torch.equal(parsed.vector, vector) and parsed.metrics == HeadMetrics(1.0, 1, 0.1, 2.0)
    assert set(content[P.ARRAYS]) == {P.HEAD_GRADIENT}  # one flat vector, nothing else


def test_a_secure_head_sum_is_stepped_as_the_plain_replies_summing_to_it():
    """Under secure aggregation the strategy steps the unmasked sum of K institutions' head gradients
    (server.secure_head) exactly as it steps K plain head replies whose vectors add up to it."""
    gen = torch.Generator().manual_seed(1)
    vectors = [torch.randn(VALUES, generator=gen) for _ in range(3)]
    torch.manual_seed(0)  # the same round-0 head for both
    plain = strategy_after_round_0(300.0, 3)
    want, _ = plain.aggregate_train(1, [head_reply(n, v) for n, v in enumerate(vectors, start=1)])
    torch.manual_seed(0)
    secure = strategy_after_round_0(300.0, 3)
    metrics = HeadMetrics(epsilon=1.0, steps=1, train_seconds=0.1, noise_std=2.0).values()
    clients = [{"node": n, **metrics} for n in (1, 2, 3)]
    log = RoundLog(1, clients=clients, aggregation={"secagg_survivors": 3.0})
    total = summed_gradient(vectors)
    got, summary = secure.aggregate_train(1, [], SecureHead(log, total, 3))
    for key in (W, B):
        assert torch.allclose(from_record(got)[key], from_record(want)[key], atol=1e-6), key
    assert not torch.allclose(from_record(got)[W], plain.global_adapter.state[W])  # the head moved
    entry = secure.rounds[-1]
    assert entry.head_gradients == 3 and entry.aggregation["secagg_survivors"] == 3.0
    assert summary[P.EPSILON] == 1.0
    # discarded (no sum): nothing to step, the global stays
    discarded = SecureHead(RoundLog(1), None, 0)
    assert strategy_after_round_0(300.0, 3).aggregate_train(1, [], discarded) == (None, None)
