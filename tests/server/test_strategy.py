"""The server's LoRA strategy on hand-built replies: screening through the codec (a malformed or
hostile reply is dropped, never the round), bounded weights and norms, and aggregation of deltas."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

from fedlora.common import protocol as P
from fedlora.common.adapter import from_record, to_record
from fedlora.common.codec import EvaluateMetrics, TrainMetrics, evaluate_reply, train_reply
from fedlora.common.config import load_config
from fedlora.common.errors import FedloraError
from fedlora.common.lora_math import layer_products
from fedlora.common.model import lora_scale
from fedlora.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedlora.server.history import summarise_round
from fedlora.server.optimisers import FedAdam
from fedlora.server.screening import MAX_REASON, capped
from fedlora.server.strategy import build_strategy
from helpers.messages import metadata, reply_message

FP = "f1ngerpr1nt"
A, B, HEAD = (
    "base_model.model.l0.q.lora_A.weight",
    "base_model.model.l0.q.lora_B.weight",
    "base_model.model.classifier.weight",
)
SHAPES = {A: (4, 6), B: (5, 4), HEAD: (3, 5)}


def state(seed: int, scale: float = 1.0, rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {A: (rank, 6), B: (5, rank), HEAD: (3, 5)}
    return {k: scale * torch.randn(s, generator=g) for k, s in shapes.items()}


def content(update: dict, num: float, fingerprint: str = FP, **metrics) -> RecordDict:
    """A train reply as the ClientApp builds it (codec), at rank 4 and scale 4 unless told."""
    values = {
        "num_examples": num,
        "epsilon": 0.5,
        "lora_r": 4,
        "lora_scale": 4.0,
        "steps": 3,
        "train_seconds": 1.0,
        "loss": 1.0,
        **metrics,
    }
    return train_reply(update, TrainMetrics(**values), fingerprint)


def reply(node: int, update: dict, num: float, fingerprint: str = FP, **metrics) -> Message:
    return reply_message(node, content(update, num, fingerprint, **metrics))


WIRE = {P.EPSILON: 0.5, P.LORA_R: 4, P.LORA_SCALE: 4.0, P.STEPS: 3, P.TRAIN_SECONDS: 1.0, P.LOSS: 1.0}


def raw_reply(node: int, update: dict, num: float, fingerprint: str = FP, **metrics) -> Message:
    """A reply built by hand, past the codec's own checks (what a hostile client can send); a
    metric given as None is left out."""
    values = {k: v for k, v in {**WIRE, P.NUM_EXAMPLES: num, **metrics}.items() if v is not None}
    records = {P.ARRAYS: to_record(update), P.METRICS: MetricRecord(values)}
    return reply_message(node, RecordDict({**records, P.CONFIG: ConfigRecord({P.FINGERPRINT: fingerprint})}))


def error_reply(node: int, reason: str, code: int = 2) -> Message:
    """A failed reply; code 2 is Flower's "ClientApp raised an exception", whose text is the client's."""
    md = metadata(node, 0, reply_to="x")
    return Message(error=Error(code=code, reason=reason), metadata=md)


def begin(s, adapter: dict[str, torch.Tensor]) -> None:
    """The strategy as configure_train leaves it: ``adapter`` sent as the round's global adapter."""
    arrays = ArrayRecord({k: v.contiguous() for k, v in adapter.items()})
    s.set_global(arrays)
    s.sent = {k: a.numpy() for k, a in arrays.items()}


@pytest.fixture
def strategy():
    cfg = load_config(overrides=["model.lora_r=4", "model.lora_alpha=16", "federation.min_clients=2"])
    s = build_strategy(cfg, FP, num_clients=3)
    begin(s, state(0))
    return s



def assert_weighted_mean(strategy, arrays: ArrayRecord, deltas: list[dict], nums: list[int]) -> None:
    """The new global is the old plus the example-weighted mean of ``deltas``, computed by hand."""
    got = from_record(arrays)
    for key in SHAPES:
        hand = strategy.global_adapter.state[key] + sum(
            n * d[key] for d, n in zip(deltas, nums, strict=True)
        ) / sum(nums)
        torch.testing.assert_close(got[key], hand, rtol=1e-6, atol=1e-6)

def test_fedavg_of_deltas_is_the_weighted_mean(strategy) -> None:
    deltas, nums = [state(1, 0.1), state(2, 0.1), state(3, 0.1)], [20, 30, 40]
    arrays, metrics = strategy.aggregate_train(
        1, [reply(i + 1, d, n) for i, (d, n) in enumerate(zip(deltas, nums, strict=True))]
    )
    assert_weighted_mean(strategy, arrays, deltas, nums)
    assert metrics[P.NUM_EXAMPLES] == 90
    assert strategy.rounds[-1].dropped == []


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (
            lambda: raw_reply(
                9,
                {**state(4, 0.1), "base_model.model.l0.q.lora_A.weight": torch.full((4, 6), float("nan"))},
                50,
            ),
            "non-finite",
        ),
        (
            lambda: reply(9, {**state(4, 0.1), "base_model.model.l0.q.lora_B.weight": torch.zeros(5, 8)}, 50),
            "shape",
        ),
        (lambda: reply(9, state(4, 0.1), 50, fingerprint="someone-else"), "fingerprint"),
        (
            lambda: reply(9, {k: v for k, v in state(4, 0.1).items() if "classifier" not in k}, 50),
            "missing key",
        ),
        (
            lambda: reply(9, {**state(4, 0.1), "base_model.model.extra.weight": torch.zeros(2)}, 50),
            "unexpected key",
        ),
        (lambda: raw_reply(9, state(4, 0.1), -5), "expected >= 1"),
        (lambda: error_reply(9, "data error", code=102), "data error"),
    ],
    ids=["nan", "wrong-shape", "wrong-fingerprint", "missing-key", "extra-key", "negative-count", "error"],
)
def test_bad_reply_is_dropped_and_round_completes(strategy, bad, reason) -> None:
    good = [state(1, 0.1), state(2, 0.1)]
    arrays, _ = strategy.aggregate_train(1, [reply(1, good[0], 20), bad(), reply(2, good[1], 20)])
    dropped = strategy.rounds[-1].dropped
    assert [d["node"] for d in dropped] == [9]
    assert reason in dropped[0]["reason"]
    got = from_record(arrays)
    for key in SHAPES:
        hand = strategy.global_adapter.state[key] + (good[0][key] + good[1][key]) / 2
        torch.testing.assert_close(got[key], hand, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("code", "reason", "kept"),
    [
        (102, "data error", "data error"),
        (2, "DataError: label 'Patient Jane Roe, 54, chest pain' is not one of", "text is withheld"),
        (102, "data error: Patient Jane Roe, 54, chest pain", "text is withheld"),
        (0, "Patient Jane Roe, 54, chest pain", "text is withheld"),
        (5, "Error: node 7 is unavailable: Patient Jane Roe", "node unavailable (Flower error code 5)"),
    ],
    ids=["fedlora-category", "flower-exception-text", "category-with-text", "unknown", "transport"],
)
def test_the_coordinator_keeps_only_a_fixed_category_of_a_failure(strategy, code, reason, kept) -> None:
    """Issue 13, item 2 (server side): a failure's free text may quote the institution's data, so
    only fedlora's fixed categories and Flower's own transport reasons reach the round's log."""
    strategy.aggregate_train(1, [reply(1, state(1, 0.1), 20), error_reply(9, reason, code=code)])
    strategy.aggregate_evaluate(1, [error_reply(9, reason, code=code)])
    for dropped in (strategy.rounds[-1].dropped, strategy.rounds[-1].evaluate_dropped):
        assert [d["node"] for d in dropped] == [9]
        assert kept in dropped[0]["reason"]
        assert "Jane Roe" not in dropped[0]["reason"]


def test_replies_are_aggregated_in_node_order_not_arrival_order(strategy) -> None:
    """Float sums depend on order: a resumed round must see the replies as an uninterrupted one did."""
    replies = {n: reply(n, state(n, 0.1), 10 * n) for n in (1, 2, 3)}
    first, _ = strategy.aggregate_train(1, [replies[3], replies[1], replies[2]])
    second, _ = strategy.aggregate_train(1, [replies[2], replies[3], replies[1]])
    assert [c["node"] for c in strategy.rounds[-2].clients] == [1, 2, 3]
    assert [c["node"] for c in strategy.rounds[-1].clients] == [1, 2, 3]
    a, b = from_record(first), from_record(second)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_norm_bound_drops_oversized_update() -> None:
    cfg = load_config(overrides=["model.lora_r=4", "model.lora_alpha=16", "federation.max_update_norm=1.0"])
    s = build_strategy(cfg, FP, num_clients=2)
    begin(s, state(0))
    s.aggregate_train(1, [reply(1, state(1, 0.01), 10), reply(2, state(2, 10.0), 10)])
    assert [d["node"] for d in s.rounds[-1].dropped] == [2]
    assert "exceeds the bound" in s.rounds[-1].dropped[0]["reason"]


def test_no_usable_reply_keeps_the_global(strategy) -> None:
    assert strategy.aggregate_train(1, [error_reply(1, "x"), reply(2, state(1), 5, fingerprint="other")]) == (
        None,
        None,
    )


def test_epsilon_reports_the_largest_spend(strategy) -> None:
    _, metrics = strategy.aggregate_train(
        1, [reply(1, state(1, 0.1), 10, **{P.EPSILON: 2.0}), reply(2, state(2, 0.1), 90, **{P.EPSILON: 7.0})]
    )
    assert metrics[P.EPSILON] == 7.0


def test_server_optimiser_state_round_trips() -> None:
    cfg = load_config(overrides=["model.lora_r=4", "model.lora_alpha=16", "federation.strategy=fedadam"])
    s = build_strategy(cfg, FP, num_clients=2)
    assert isinstance(s.optimiser, FedAdam)
    begin(s, state(0))
    arrays, _ = s.aggregate_train(1, [reply(1, state(1, 0.1), 10), reply(2, state(2, 0.1), 10)])
    plain_mean = {k: s.global_adapter.state[k] + (state(1, 0.1)[k] + state(2, 0.1)[k]) / 2 for k in SHAPES}
    got = from_record(arrays)
    assert any(not torch.allclose(got[k], plain_mean[k]) for k in SHAPES)  # Adam moved it differently
    saved = s.state_tensors()
    assert {k.split("/")[0] for k in saved} == {"m_t", "v_t", "node_layout", "node_epsilon"}
    fresh = build_strategy(cfg, FP, num_clients=2)
    fresh.load_state_tensors(saved)
    for name in ("m_t", "v_t"):
        for k, v in s.optimiser.moments[name].items():
            assert (fresh.optimiser.moments[name][k] == v).all()


class Nodes:
    """The one part of a Grid that sampling reads: which nodes are connected."""

    def __init__(self, *ids: int) -> None:
        self.ids = ids

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


@pytest.mark.parametrize("optimiser", ["fedavg", "fedprox"])
def test_train_messages_carry_the_absolute_round_the_layout_and_the_optimisers_config(
    optimiser: str, monkeypatch
) -> None:
    for field in ("_task_id", "_run_id", "_node_id"):  # what a ServerApp process would have set
        monkeypatch.setattr(TaskIdentity, field, 1)
    cfg = load_config(overrides=["model.lora_r=4", "model.lora_alpha=16", f"federation.strategy={optimiser}"])
    s = build_strategy(cfg, FP, num_clients=2)
    arrays = ArrayRecord({k: v.contiguous() for k, v in state(0).items()})
    messages = list(s.configure_train(7, arrays, ConfigRecord(), Nodes(1, 2)))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2]
    config = messages[0].content[P.CONFIG]
    assert (config[P.ROUND], config[P.FINGERPRINT], config[P.LORA_R], config[P.LORA_SCALE]) == (7, FP, 4, 4.0)
    assert config.get(P.PROXIMAL_MU) == (cfg.federation.proximal_mu if optimiser == "fedprox" else None)


def test_lower_rank_nodes_evaluate_the_new_global_truncated_once_per_rank(monkeypatch) -> None:
    """After aggregation the evaluate messages carry the new global adapter, at each known node's
    rank with its fold; the SVD is done once per rank and adapter, not once per node."""
    cfg = load_config(overrides=["model.lora_r=4", "model.lora_alpha=16", "federation.aggregator=exact"])
    s = build_strategy(cfg, FP, num_clients=3)
    for field in ("_task_id", "_run_id", "_node_id"):  # what a ServerApp process would have set
        monkeypatch.setattr(TaskIdentity, field, 1)
    s.node_layouts = {1: (2, 8.0), 2: (2, 8.0), 3: (4, 4.0)}
    old, new = state(0), state(5)
    begin(s, old)
    s.global_adapter.own(2, 8.0)
    calls = []
    truncate = s.aggregator.for_client
    monkeypatch.setattr(s.aggregator, "for_client", lambda *a: calls.append(a[1:]) or truncate(*a))
    messages = s.configure_evaluate(
        1, ArrayRecord({k: v.contiguous() for k, v in new.items()}), ConfigRecord(), Nodes(1, 2, 3)
    )
    by_node = {m.metadata.dst_node_id: m.content for m in messages}
    expected = truncate(new, 2, 8.0)
    for node in (1, 2):
        got = from_record(by_node[node][P.ARRAYS])
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
        assert by_node[node][P.CONFIG][P.LORA_R] == 2 and P.FOLD in by_node[node]
    assert from_record(by_node[3][P.ARRAYS]).keys() == new.keys() and P.FOLD not in by_node[3]
    assert calls == [(2, 8.0)]


# --- One client must not be able to poison or stop a federation (issue 13) ---

AGGREGATOR_SETS = {
    "fedavg": (),
    "exact": ("federation.aggregator=exact",),
    "ffa": ("federation.aggregator=ffa", "model.variant=ffa"),
}


def federation(aggregator: str, *overrides: str):
    """A coordinator at rank 4, scale 4 (alpha 16) with a random global adapter."""
    cfg = load_config(
        overrides=[
            "model.lora_r=4",
            "model.lora_alpha=16",
            "federation.min_clients=2",
            *AGGREGATOR_SETS[aggregator],
            *overrides,
        ]
    )
    s = build_strategy(cfg, FP, num_clients=4)
    begin(s, state(0))
    return s


def wire(s, update: dict) -> dict:
    """What a client of this federation sends: under ffa, no A."""
    return {k: update[k] for k in s.aggregator.wire_keys(s.global_adapter.state)}


def honest(s, node: int, num: float = 20, **metrics) -> Message:
    return reply(node, wire(s, state(node, 0.01)), num, **metrics)


def round_of(aggregator: str, replies, *overrides: str):
    s = federation(aggregator, *overrides)
    arrays, metrics = s.aggregate_train(1, replies(s))
    return s, arrays, metrics


def assert_same(arrays: ArrayRecord, other: ArrayRecord) -> None:
    got, want = from_record(arrays), from_record(other)
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)


def second_record(s, node: int, name: str, record) -> Message:
    content = honest(s, node).content
    content[name] = record
    return reply_message(node, content)


MALFORMED = {
    "extra-metric": lambda s: raw_reply(9, wire(s, state(9, 0.01)), 20, extra=1.0),
    "missing-metric": lambda s: raw_reply(9, wire(s, state(9, 0.01)), 20, **{P.STEPS: None}),
    "list-metric": lambda s: raw_reply(9, wire(s, state(9, 0.01)), 20, **{P.LOSS: [1.0, 2.0]}),
    "second-arrayrecord": lambda s: second_record(s, 9, "more", ArrayRecord(wire(s, state(9, 0.01)))),
    "second-metricrecord": lambda s: second_record(s, 9, "more", MetricRecord({P.NUM_EXAMPLES: 5})),
}


@pytest.mark.parametrize("aggregator", sorted(AGGREGATOR_SETS))
@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_reply_is_dropped_not_the_round(aggregator: str, kind: str, caplog) -> None:
    caplog.set_level(logging.WARNING, "fedlora.server")
    s, arrays, _ = round_of(aggregator, lambda s: [honest(s, 1), MALFORMED[kind](s), honest(s, 2)])
    assert [d["node"] for d in s.rounds[-1].dropped] == [9]
    assert "dropped train reply from node 9" in caplog.text
    _, clean, _ = round_of(aggregator, lambda s: [honest(s, 1), honest(s, 2)])
    assert_same(arrays, clean)


@pytest.mark.parametrize("aggregator", sorted(AGGREGATOR_SETS))
def test_replies_with_and_without_the_optional_loss_aggregate(aggregator: str) -> None:
    s, arrays, metrics = round_of(
        aggregator, lambda s: [honest(s, 1, loss=0.25), honest(s, 2, loss=None), honest(s, 3, loss=None)]
    )
    assert arrays is not None and s.rounds[-1].dropped == []
    assert metrics[P.LOSS] == 0.25 and metrics[P.NUM_EXAMPLES] == 60


@pytest.mark.parametrize("aggregator", sorted(AGGREGATOR_SETS))
def test_a_huge_example_claim_takes_at_most_the_share_cap(aggregator: str) -> None:
    """Three honest replies of 10 and one claiming 1e12: the claim weighs as 30, half the round."""
    s, arrays, _ = round_of(
        aggregator, lambda s: [honest(s, n, 10) for n in (1, 2, 3)] + [honest(s, 4, 1e12)]
    )
    assert s.rounds[-1].clients[-1]["weight"] == pytest.approx(0.5)
    _, capped, _ = round_of(aggregator, lambda s: [honest(s, n, 10) for n in (1, 2, 3)] + [honest(s, 4, 30)])
    assert_same(arrays, capped)


def test_max_examples_one_weighs_every_reply_the_same() -> None:
    _, arrays, _ = round_of(
        "exact", lambda s: [honest(s, 1, 10), honest(s, 2, 1000)], "federation.max_examples=1"
    )
    _, equal, _ = round_of("exact", lambda s: [honest(s, 1, 7), honest(s, 2, 7)])
    assert_same(arrays, equal)


@pytest.mark.parametrize("aggregator", sorted(AGGREGATOR_SETS))
def test_a_claim_below_one_drops_that_reply_not_the_round(aggregator: str) -> None:
    s, arrays, _ = round_of(aggregator, lambda s: [honest(s, 1), raw_reply(9, wire(s, state(9)), 0.5)])
    assert [d["node"] for d in s.rounds[-1].dropped] == [9] and arrays is not None
    s, arrays, _ = round_of(
        aggregator, lambda s: [raw_reply(n, wire(s, state(n)), 0.5) for n in (1, 2)] + [error_reply(3, "x")]
    )
    assert (arrays, len(s.rounds[-1].dropped)) == (None, 3)


@pytest.mark.parametrize(("aggregator", "scale"), [("fedavg", 1e-30), ("exact", 1e6), ("ffa", 1e6)])
def test_an_absurd_lora_scale_is_dropped(aggregator: str, scale: float) -> None:
    s, arrays, _ = round_of(
        aggregator,
        lambda s: [
            honest(s, 1),
            raw_reply(9, wire(s, state(9, 0.01)), 20, **{P.LORA_SCALE: scale}),
            honest(s, 2),
        ],
    )
    assert [d["node"] for d in s.rounds[-1].dropped] == [9]
    assert "'lora-scale'" in s.rounds[-1].dropped[0]["reason"]
    _, clean, _ = round_of(aggregator, lambda s: [honest(s, 1), honest(s, 2)])
    assert_same(arrays, clean)


@pytest.mark.parametrize("aggregator", ["exact", "ffa"])
def test_the_norm_bound_is_on_the_weight_change_not_the_factors(aggregator: str) -> None:
    """A scale 50x the coordinator's (within max_scale_ratio) with factors far under the bound still
    moves the weights far past it: dropped. An honest reply under the bound passes."""
    s, _, _ = round_of(
        aggregator,
        lambda s: [
            honest(s, 1),
            raw_reply(9, wire(s, state(9, 0.05)), 20, **{P.LORA_SCALE: 200.0}),
            honest(s, 2),
        ],
        "federation.max_update_norm=1.0",
    )
    dropped = s.rounds[-1].dropped
    assert [d["node"] for d in dropped] == [9] and "exceeds the bound" in dropped[0]["reason"]
    assert all(c["update_norm"] < 1.0 for c in s.rounds[-1].clients)


def test_update_norm_is_the_change_of_the_product() -> None:
    s, _, _ = round_of("exact", lambda s: [honest(s, 1), honest(s, 2)])
    start, update = state(0), state(1, 0.01)
    after = {k: start[k] + update[k] for k in start}
    before_p, after_p = layer_products(start, 4.0), layer_products(after, 4.0)
    want = sum(float((after_p[p] - before_p[p]).pow(2).sum()) for p in after_p)
    want = (want + float(update[HEAD].double().pow(2).sum())) ** 0.5
    assert s.rounds[-1].clients[0]["update_norm"] == pytest.approx(want)


@pytest.mark.parametrize("aggregator", sorted(AGGREGATOR_SETS))
def test_a_huge_claimed_rank_is_refused_before_anything_is_allocated(aggregator: str, monkeypatch) -> None:
    s = federation(aggregator)
    truncate = s.aggregator.for_client

    def guarded(global_state, rank, scale):
        assert rank <= 64, f"the server worked at claimed rank {rank}"
        return truncate(global_state, rank, scale)

    monkeypatch.setattr(s.aggregator, "for_client", guarded)
    s.aggregate_train(1, [honest(s, 1), raw_reply(9, wire(s, state(9, 0.01)), 20, **{P.LORA_R: 10**9})])
    assert [d["node"] for d in s.rounds[-1].dropped] == [9]
    assert "'lora-r': 1e+09" in s.rounds[-1].dropped[0]["reason"]


@pytest.mark.parametrize("aggregator", ["fedavg", "ffa"])
def test_another_rank_than_the_coordinators_is_dropped_without_mixed_ranks(aggregator: str) -> None:
    s, arrays, _ = round_of(
        aggregator,
        lambda s: [honest(s, 1), reply(9, wire(s, state(9, 0.01, rank=8)), 20, lora_r=8, lora_scale=2.0)],
    )
    dropped = s.rounds[-1].dropped
    assert [d["node"] for d in dropped] == [9] and arrays is not None
    assert "'lora-r': 8, the coordinator allows only 4" in dropped[0]["reason"]
    assert f"federation.aggregator {aggregator} needs lora_r 4" in dropped[0]["reason"]


def test_exact_takes_ranks_up_to_max_rank() -> None:
    s, arrays, _ = round_of(
        "exact",
        lambda s: [
            honest(s, 1),
            reply(2, state(2, 0.01, rank=2), 20, lora_r=2, lora_scale=8.0),
            reply(9, state(9, 0.01, rank=16), 20, lora_r=16, lora_scale=1.0),
        ],
        "federation.max_rank=8",
    )
    assert [d["node"] for d in s.rounds[-1].dropped] == [9] and arrays is not None
    assert "allows 1 to 8" in s.rounds[-1].dropped[0]["reason"]
    with pytest.raises(FedloraError, match=r"federation\.max_rank: 2 is below"):
        federation("exact", "federation.max_rank=2")


def test_fedavg_drops_another_lora_alpha_at_the_same_rank_naming_the_scale() -> None:
    """fedavg averages A and B apart: factors trained at another scale cannot be averaged with the
    others', so the honest institution is told what to set instead of being mis-aggregated."""
    s, arrays, _ = round_of("fedavg", lambda s: [honest(s, 1), honest(s, 2), honest(s, 9, lora_scale=2.0)])
    reason = s.rounds[-1].dropped[0]["reason"]
    assert "'lora-scale': 2, the coordinator allows only 4" in reason and "lora_alpha / lora_r" in reason
    _, clean, _ = round_of("fedavg", lambda s: [honest(s, 1), honest(s, 2)])
    assert_same(arrays, clean)


def test_exact_converts_another_lora_alpha_exactly() -> None:
    """The same trained weights sent at scale 2 instead of 4 give the same next global adapter."""
    _, at_four, _ = round_of("exact", lambda s: [honest(s, 1), honest(s, 2)])
    s = federation("exact")
    start_two = s.aggregator.for_client(s.global_adapter.state, 4, 2.0)
    final = {k: s.global_adapter.state[k] + state(2, 0.01)[k] for k in SHAPES}
    final[B] = final[B] * 2  # 2 * (2B) @ A == 4 * B @ A
    delta = {k: final[k] - start_two[k] for k in SHAPES}
    arrays, _ = s.aggregate_train(1, [honest(s, 1), reply(2, delta, 20, lora_scale=2.0)])
    assert s.rounds[-1].dropped == []
    assert_same(arrays, at_four)


def test_when_every_reply_is_dropped_the_round_keeps_the_global_and_says_why(caplog) -> None:
    caplog.set_level(logging.WARNING, "fedlora.server")
    s = federation("fedavg")
    bad = [raw_reply(1, state(1, 0.01), 20, extra=1.0), raw_reply(2, state(2, 0.01), 20, **{P.STEPS: None})]
    assert s.aggregate_train(1, bad) == (None, None)
    assert [d["node"] for d in s.rounds[-1].dropped] == [1, 2]
    assert "no usable reply; the global adapter stays as it was" in caplog.text


def test_a_malformed_evaluate_reply_is_dropped_not_fatal(caplog) -> None:
    caplog.set_level(logging.WARNING, "fedlora.server")
    s = federation("fedavg")
    s.aggregate_train(1, [honest(s, 1), honest(s, 2)])
    replies = [
        reply_message(1, evaluate_reply(EvaluateMetrics(10, loss=0.5, accuracy=0.8))),
        reply_message(2, evaluate_reply(EvaluateMetrics(30))),
        reply_message(3, RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: 5, "extra": 1.0})})),
        reply_message(4, RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: 5, P.LOSS: [0.1, 0.2]})})),
        error_reply(5, "boom"),
    ]
    metrics = s.aggregate_evaluate(1, replies)
    assert metrics[P.NUM_EXAMPLES] == 40 and metrics[P.LOSS] == 0.5 and metrics[P.ACCURACY] == 0.8
    assert [d["node"] for d in s.rounds[-1].evaluate_dropped] == [3, 4, 5]
    assert "dropped evaluate reply from node 3: unexpected metric 'extra'" in caplog.text


def test_default_bounds_keep_the_benchmarks_mixed_rank_settings_valid() -> None:
    """Every client rank and scale of the aggregators benchmark's mixed-rank settings lies within
    what the default max_rank and max_scale_ratio allow."""
    from benchmarks.aggregators import settings
    from fedlora.simulations.cli import default_config

    base = load_config(default_config())
    mixed = [
        setting
        for setting in settings(True, [1, 4, 8, 16, 32], False, base.model.lora_r, base.model.lora_alpha)
        if any("client_ranks" in o for o in setting.overrides)
    ]
    assert len(mixed) == 3
    for setting in mixed:
        cfg = load_config(default_config(), setting.overrides)
        s = build_strategy(cfg, FP, num_clients=cfg.simulation.num_clients)
        begin(s, state(0, rank=cfg.model.lora_r))
        rules = s.screen.rules(s.global_adapter)
        for rank in cfg.simulation.client_ranks:
            scale = lora_scale(dataclasses.replace(cfg.model, lora_r=rank))
            assert rules.ranks[0] <= rank <= rules.ranks[1], setting.name
            assert rules.scales[0] <= scale <= rules.scales[1], setting.name


# --- A node's spend never goes down; a client's strings and claims stay bounded (issue 26) ---


def test_a_reply_whose_epsilon_went_down_is_dropped_naming_the_node(tmp_path) -> None:
    """A lost or reset ledger restarts an institution's budget: the coordinator remembers each node's
    cumulative epsilon, refuses a lower one, and still does after a restart from its checkpoint."""
    s = federation("fedavg")
    s.aggregate_train(1, [honest(s, 1, epsilon=2.0), honest(s, 2, epsilon=2.0)])
    s.aggregate_train(2, [honest(s, 1, epsilon=3.5), honest(s, 2, epsilon=3.5)])
    arrays, _ = s.aggregate_train(3, [honest(s, 1, epsilon=1.2), honest(s, 2, epsilon=4.4)])
    assert arrays is not None and [c["node"] for c in s.rounds[-1].clients] == [2]
    dropped = s.rounds[-1].dropped
    assert [d["node"] for d in dropped] == [1]
    assert dropped[0]["reason"].startswith("node 1 reports cumulative epsilon 1.2, below the 3.5")
    assert "\n" not in dropped[0]["reason"]

    save_checkpoint(tmp_path, Checkpoint(3, FP, s.global_adapter.state, s.state_tensors(), []))
    restarted = federation("fedavg")
    restarted.load_state_tensors(load_checkpoint(tmp_path).strategy)
    restarted.aggregate_train(4, [honest(restarted, 1, epsilon=3.0), honest(restarted, 2, epsilon=4.4)])
    assert [d["node"] for d in restarted.rounds[-1].dropped] == [1]
    assert "below the 3.5" in restarted.rounds[-1].dropped[0]["reason"]
    restarted.aggregate_train(5, [honest(restarted, 1, epsilon=3.5), honest(restarted, 2, epsilon=5.0)])
    assert restarted.rounds[-1].dropped == []  # back at its spend (restored ledger): accepted again


def test_a_refused_replys_client_strings_are_recorded_cut_short(caplog) -> None:
    """4 MB of a client's metric key, fingerprint or array key were kept whole in the log, the round's
    history and every checkpoint; what is recorded of a refusal is now at most MAX_REASON characters."""
    caplog.set_level(logging.WARNING, "fedlora.server")
    s = federation("fedavg")
    huge = "x" * 4_000_000
    hostile = [
        raw_reply(7, wire(s, state(7, 0.01)), 20, **{huge: 1.0}),
        reply(8, wire(s, state(8, 0.01)), 20, fingerprint=huge),
        reply(9, {**wire(s, state(9, 0.01)), huge: torch.zeros(2)}, 20),
    ]
    s.aggregate_train(1, [honest(s, 1), *hostile])
    reasons = [d["reason"] for d in s.rounds[-1].dropped]
    assert [d["node"] for d in s.rounds[-1].dropped] == [7, 8, 9]
    assert all(len(r) <= MAX_REASON and "xxxx" in r for r in reasons), [len(r) for r in reasons]
    assert len(caplog.text) < 10 * MAX_REASON
    assert len(capped("y" * 10_000)) == MAX_REASON and capped("y" * 10_000).endswith(
        "10000 characters in all]"
    )


def test_a_nodes_second_reply_in_one_round_is_dropped() -> None:
    """Two replies of one node in one batch counted its update (or its score) twice: only its
    first counts."""
    s, arrays, _ = round_of("fedavg", lambda s: [honest(s, 1), honest(s, 2), honest(s, 2, 1000)])
    assert [c["node"] for c in s.rounds[-1].clients] == [1, 2]
    assert [d["node"] for d in s.rounds[-1].dropped] == [2]
    assert "second reply" in s.rounds[-1].dropped[0]["reason"]
    _, clean, _ = round_of("fedavg", lambda s: [honest(s, 1), honest(s, 2)])
    assert_same(arrays, clean)
    score = [reply_message(n, evaluate_reply(EvaluateMetrics(10, accuracy=0.8))) for n in (1, 2)]
    metrics = s.aggregate_evaluate(
        1, [*score, reply_message(2, evaluate_reply(EvaluateMetrics(10, accuracy=0.0)))]
    )
    assert metrics[P.ACCURACY] == pytest.approx(0.8) and metrics[P.NUM_EXAMPLES] == 20
    assert [d["node"] for d in s.rounds[-1].evaluate_dropped] == [2]


def test_a_huge_evaluate_claim_weighs_as_a_training_claim_would() -> None:
    """An evaluate reply claiming 1e12 examples takes at most the share cap, as in training."""
    s = federation("fedavg")
    honest_scores = [reply_message(n, evaluate_reply(EvaluateMetrics(10, accuracy=0.8))) for n in (1, 2, 3)]
    liar = reply_message(4, evaluate_reply(EvaluateMetrics(1e12, accuracy=0.0)))
    metrics = s.aggregate_evaluate(1, [*honest_scores, liar])
    assert s.weighting([10, 10, 10, 1e12]) == [10, 10, 10, 30]
    assert metrics[P.ACCURACY] == pytest.approx(0.4)


@pytest.mark.parametrize("honest_nodes", [(1,), (1, 2), (1, 2, 3)])
def test_by_default_an_update_far_above_the_rounds_median_is_dropped(honest_nodes) -> None:
    """The default configuration accepted a well-formed update 15,000x the honest norm (weight 0.5):
    federation.max_norm_ratio (10 by default) drops it, with two replies as with more."""
    s = federation("fedavg")
    huge = reply(9, {k: 15_000 * v for k, v in wire(s, state(9, 0.01)).items()}, 20)
    s.aggregate_train(1, [*(honest(s, n) for n in honest_nodes), huge])
    assert [c["node"] for c in s.rounds[-1].clients] == list(honest_nodes)
    assert [d["node"] for d in s.rounds[-1].dropped] == [9]
    assert "times the round's median" in s.rounds[-1].dropped[0]["reason"]
    assert "federation.max_norm_ratio 10" in s.rounds[-1].dropped[0]["reason"]


def test_the_median_bound_keeps_honest_spread_and_can_be_switched_off() -> None:
    s = federation("fedavg")
    spread = [reply(n, wire(s, state(n, 0.01 * n)), 20) for n in (1, 2, 3)]  # norms 1x, 2x, 3x
    s.aggregate_train(1, spread)
    assert s.rounds[-1].dropped == []
    off = federation("fedavg", "federation.max_norm_ratio=null")
    off.aggregate_train(
        1, [honest(off, 1), reply(9, {k: 15_000 * v for k, v in wire(off, state(9, 0.01)).items()}, 20)]
    )
    assert off.rounds[-1].dropped == []


def test_an_empty_update_of_no_steps_is_left_out_of_the_average(strategy) -> None:
    """An institution whose planner skipped LoRA (client.recipe) answers with a zero delta and 0
    steps; averaged in with its 1,000 rows it would take half the weight (the share cap) and halve
    the others' update."""
    deltas, nums = [state(1, 0.1), state(2, 0.1)], [20, 20]
    empty = {k: torch.zeros_like(v) for k, v in state(3).items()}
    replies = [reply(1, deltas[0], nums[0]), reply(2, deltas[1], nums[1]), reply(3, empty, 1000, steps=0)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert_weighted_mean(strategy, arrays, deltas, nums)
    assert [c["node"] for c in strategy.rounds[-1].clients] == [1, 2]
    assert metrics[P.NUM_EXAMPLES] == 40
    assert strategy.rounds[-1].statistics_only == 1


def test_a_round_of_only_empty_updates_keeps_the_global_without_a_warning(strategy, caplog) -> None:
    """Where every institution's planner skipped LoRA (the default preset's hospitals), the rounds
    are expected to change nothing: no warning of unusable replies each round."""
    empty = {k: torch.zeros_like(v) for k, v in state(3).items()}
    with caplog.at_level(logging.INFO):
        result = strategy.aggregate_train(1, [reply(1, empty, 20, steps=0), reply(2, empty, 30, steps=0)])
    assert result == (None, None)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "planned no LoRA steps" in caplog.text
    line = summarise_round(dataclasses.asdict(strategy.rounds[-1])).line(8)
    assert line.startswith("round 1/8: 0 replies, 0 dropped, 2 statistics only (no LoRA steps planned)")


def test_nodes_the_superlink_reports_unavailable_are_dropped_under_their_own_ids(monkeypatch) -> None:
    """Two institutions killed during a LoRA round: the SuperLink answers for each as node 1, in reply
    to the message sent to it. Both are dropped under their own ids (not node 1, and the second not
    as 'a second reply from node 1'); the live institution's update is aggregated."""
    for field in ("_task_id", "_run_id", "_node_id"):  # what a ServerApp process would have set
        monkeypatch.setattr(TaskIdentity, field, 1)
    cfg = load_config(overrides=["model.lora_r=4", "model.lora_alpha=16", "federation.min_clients=3"])
    s = build_strategy(cfg, FP, num_clients=3)
    arrays = ArrayRecord({k: v.contiguous() for k, v in state(0).items()})
    messages = list(s.configure_train(1, arrays, ConfigRecord(), Nodes(11, 12, 13)))
    for msg in messages:
        msg.metadata.__dict__["_message_id"] = msg.object_id  # as flwr's grid does on push
    replies = [
        create_message_error_unavailable_res_message(m.metadata, "node_unavail")
        for m in messages
        if m.metadata.dst_node_id != 11
    ]
    replies.append(reply(11, {k: v - state(0)[k] for k, v in state(1).items()}, 10))
    aggregated, _ = s.aggregate_train(1, replies)
    assert aggregated is not None
    dropped = {d["node"]: d["reason"] for d in s.rounds[-1].dropped}
    assert set(dropped) == {12, 13}
    assert all(reason.startswith("node unavailable") for reason in dropped.values())


def test_an_error_reply_about_a_message_this_strategy_never_sent_is_no_asked_nodes(monkeypatch) -> None:
    """A resumed coordinator's round (test_deployment's killed server): a SuperLink error reply, as
    node 1, about a message the strategy never sent (the killed ServerApp's) is dropped under node 1;
    it never takes the place of an asked node's reply, and both live updates are aggregated."""
    for field in ("_task_id", "_run_id", "_node_id"):  # what a ServerApp process would have set
        monkeypatch.setattr(TaskIdentity, field, 1)
    cfg = load_config(overrides=["model.lora_r=4", "model.lora_alpha=16", "federation.min_clients=2"])
    arrays = ArrayRecord({k: v.contiguous() for k, v in state(0).items()})
    killed = build_strategy(cfg, FP, num_clients=2)
    resumed = build_strategy(cfg, FP, num_clients=2)
    for s, server_round in ((killed, 1), (resumed, 2)):
        for msg in s.configure_train(server_round, arrays, ConfigRecord(), Nodes(11, 12)):
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as flwr's grid does on push
    stale = next(m for m in killed.outbox if m.metadata.dst_node_id == 12)
    update = {k: v - state(0)[k] for k, v in state(1).items()}
    replies = [
        create_message_error_unavailable_res_message(stale.metadata, "node_unavail"),
        reply(11, update, 10),
        reply(12, update, 10),
    ]
    aggregated, _ = resumed.aggregate_train(2, replies)
    assert aggregated is not None
    assert [c["node"] for c in resumed.rounds[-1].clients] == [11, 12]
    [dropped] = resumed.rounds[-1].dropped
    assert dropped["node"] == SUPERLINK_NODE_ID and dropped["reason"].startswith("node unavailable")
