"""Server aggregators: fedavg's bias, exact's products, error feedback, FFA's frozen A, registry."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedlora.common.errors import AdapterError
from fedlora.common.lora_math import lora_pairs, product, relative_error
from fedlora.server.aggregators import (
    AGGREGATORS,
    ClientUpdate,
    ExactAggregator,
    FedAvgAggregator,
    FfaAggregator,
    bounded_weights,
    create_aggregator,
    weight_change_norm,
)

HEAD = "base_model.model.classifier.modules_to_save.default.weight"
LAYERS = [
    f"base_model.model.encoder.layer.{i}.attention.self.{m}"
    for i, m in [(0, "query"), (0, "value"), (1, "query")]
]


def adapter(rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Three LoRA layers (in 12, out 10) and a classification head, all random."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix in LAYERS:
        state[f"{prefix}.lora_A.weight"] = torch.randn(rank, 12, generator=g)
        state[f"{prefix}.lora_B.weight"] = torch.randn(10, rank, generator=g)
    state[HEAD] = torch.randn(3, 12, generator=g)
    return state


def updates(ranks: list[int], scales: list[float] | None = None, seed: int = 1) -> list[ClientUpdate]:
    scales = scales or [2.0] * len(ranks)
    return [
        ClientUpdate(node, adapter(rank, seed + node), num_examples=10 * (node + 1), scale=scale)
        for node, (rank, scale) in enumerate(zip(ranks, scales, strict=True))
    ]


def weights(ups: list[ClientUpdate]) -> list[float]:
    total = sum(u.num_examples for u in ups)
    return [u.num_examples / total for u in ups]


def mean_of(ups: list[ClientUpdate], key: str) -> torch.Tensor:
    return sum(w * u.state[key].double() for w, u in zip(weights(ups), ups, strict=True))


def mean_of_products(ups: list[ClientUpdate], prefix: str) -> torch.Tensor:
    """sum_i w_i scale_i B_i @ A_i, by hand."""
    return sum(
        w
        * u.scale
        * u.state[f"{prefix}.lora_B.weight"].double()
        @ u.state[f"{prefix}.lora_A.weight"].double()
        for w, u in zip(weights(ups), ups, strict=True)
    )


def global_product(state: dict[str, torch.Tensor], prefix: str, scale: float) -> torch.Tensor:
    return product(
        state[f"{prefix}.lora_A.weight"].double(), state[f"{prefix}.lora_B.weight"].double(), scale
    )


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y))


def best_residual(p: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(p)
    return float(s[rank:].norm() / s.norm())


# registry


def test_registry_names_every_aggregator() -> None:
    assert {
        "fedavg": FedAvgAggregator,
        "exact": ExactAggregator,
        "ffa": FfaAggregator,
    } == AGGREGATORS
    made = create_aggregator("exact", global_scale=2.0, error_feedback=True)
    assert isinstance(made, ExactAggregator) and made.error_feedback


def test_registry_rejects_unknown_names_and_options() -> None:
    with pytest.raises(ValueError, match=r"'fedprox'.*fedavg, exact, ffa"):
        create_aggregator("fedprox", global_scale=2.0)
    with pytest.raises(ValueError, match=r"'fedavg' takes no option 'error_feedback'"):
        create_aggregator("fedavg", global_scale=2.0, error_feedback=True)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_no_updates_is_an_error(name: str) -> None:
    with pytest.raises(ValueError, match="no updates"):
        create_aggregator(name, global_scale=2.0).aggregate(adapter(4, 0), [])


# fedavg


def test_fedavg_is_the_weighted_mean_of_every_tensor() -> None:
    ups = updates([4, 4, 4])
    result = FedAvgAggregator(2.0).aggregate(adapter(4, 0), ups)
    for key, tensor in result.state.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor.double(), mean_of(ups, key))
    assert result.metrics["aggregation_seconds"] >= 0


def test_fedavg_is_biased_where_exact_is_not() -> None:
    ups = updates([2, 2, 2])
    fedavg = FedAvgAggregator(2.0).aggregate(adapter(2, 0), ups)
    exact = ExactAggregator(2.0).aggregate(adapter(6, 0), ups)
    for prefix in LAYERS:
        truth = mean_of_products(ups, prefix)
        # mean(B) @ mean(A) is not mean(B @ A)...
        averaged_factors = (
            2.0 * mean_of(ups, f"{prefix}.lora_B.weight") @ mean_of(ups, f"{prefix}.lora_A.weight")
        )
        bias = rel(averaged_factors, truth)
        assert bias > 0.1
        assert fedavg.metrics[f"residual/{prefix}"] == pytest.approx(bias, rel=1e-5)
        # ... while exact hits it (sum of ranks 6 <= global rank 6).
        assert rel(global_product(exact.state, prefix, 2.0), truth) < 1e-5


def test_fedavg_rejects_another_rank_naming_node_and_key() -> None:
    ups = [*updates([4, 4]), ClientUpdate(7, adapter(8, 9), 5, 2.0)]
    with pytest.raises(AdapterError, match=rf"node 7: {LAYERS[0]}\.lora_A\.weight has shape"):
        FedAvgAggregator(2.0).aggregate(adapter(4, 0), ups)


# exact


def test_exact_matches_the_mean_of_products_when_ranks_fit() -> None:
    ups = updates([2, 2, 4], scales=[1.0, 2.0, 4.0])
    result = ExactAggregator(0.5).aggregate(adapter(8, 0), ups)
    for prefix in LAYERS:
        truth = mean_of_products(ups, prefix)
        assert rel(global_product(result.state, prefix, 0.5), truth) < 1e-5
        assert result.metrics[f"residual/{prefix}"] < 1e-5
    torch.testing.assert_close(result.state[HEAD].double(), mean_of(ups, HEAD))


def test_exact_reports_the_truncation_residual() -> None:
    ups = updates([4, 4, 4])
    result = ExactAggregator(2.0).aggregate(adapter(4, 0), ups)
    expected = [best_residual(mean_of_products(ups, prefix), 4) for prefix in LAYERS]
    for prefix, want in zip(LAYERS, expected, strict=True):
        assert want > 0.05
        assert result.metrics[f"residual/{prefix}"] == pytest.approx(want, rel=1e-5)
    assert result.metrics["residual/mean"] == pytest.approx(sum(expected) / 3, rel=1e-5)


def test_exact_aggregates_mixed_ranks_and_serves_each_rank() -> None:
    aggregator = ExactAggregator(2.0)
    ups = updates([4, 8, 16], scales=[4.0, 2.0, 1.0])
    result = aggregator.aggregate(adapter(8, 0), ups)
    for prefix in LAYERS:
        assert result.state[f"{prefix}.lora_A.weight"].shape == (8, 12)
        assert result.state[f"{prefix}.lora_B.weight"].shape == (10, 8)
    for rank, scale in [(4, 4.0), (8, 2.0), (16, 1.0)]:
        sent = aggregator.for_client(result.state, rank, scale)
        assert sent[HEAD] is result.state[HEAD]
        for prefix in LAYERS:
            assert sent[f"{prefix}.lora_A.weight"].shape == (rank, 12)
            assert sent[f"{prefix}.lora_B.weight"].shape == (10, rank)
            if rank >= 8:  # at least the global rank: the client gets the very same product
                torch.testing.assert_close(
                    global_product(sent, prefix, scale),
                    global_product(result.state, prefix, 2.0),
                    rtol=1e-4,
                    atol=1e-4,
                )
    same = aggregator.for_client(result.state, 8, 2.0)
    assert all(same[key] is tensor for key, tensor in result.state.items())


def test_exact_rejects_a_client_whose_factors_disagree() -> None:
    bad = adapter(4, 5)
    bad[f"{LAYERS[1]}.lora_B.weight"] = torch.randn(10, 6)
    ups = [*updates([4]), ClientUpdate(3, bad, 5, 2.0)]
    with pytest.raises(AdapterError, match=r"node 3: .*same r"):
        ExactAggregator(2.0).aggregate(adapter(4, 0), ups)


def test_error_feedback_loses_nothing_across_rounds() -> None:
    aggregator = ExactAggregator(2.0, error_feedback=True)
    state = adapter(4, 0)
    truths, aggregated = dict.fromkeys(LAYERS, 0.0), dict.fromkeys(LAYERS, 0.0)
    for round_ in range(3):
        ups = updates([4, 4, 4], seed=10 * round_)
        state = aggregator.aggregate(state, ups).state
        for prefix in LAYERS:
            truths[prefix] = truths[prefix] + mean_of_products(ups, prefix)
            aggregated[prefix] = aggregated[prefix] + global_product(state, prefix, 2.0)
    residuals = aggregator.state_dict()
    for prefix in LAYERS:
        assert residuals[f"residual/{prefix}"].abs().max() > 0.1
        torch.testing.assert_close(aggregated[prefix] + residuals[f"residual/{prefix}"], truths[prefix])


def test_error_feedback_state_survives_a_checkpoint() -> None:
    first = ExactAggregator(2.0, error_feedback=True)
    first.aggregate(adapter(4, 0), updates([4, 4, 4]))
    resumed = ExactAggregator(2.0, error_feedback=True)
    resumed.load_state_dict(first.state_dict())
    ups = updates([4, 4, 4], seed=20)
    a, b = first.aggregate(adapter(4, 0), ups), resumed.aggregate(adapter(4, 0), ups)
    assert all(torch.equal(a.state[key], b.state[key]) for key in a.state)
    assert ExactAggregator(2.0).state_dict() == {}
    with pytest.raises(AdapterError, match="error_feedback is off"):
        ExactAggregator(2.0).load_state_dict(first.state_dict())


# ffa


def ffa_updates(global_state: dict[str, torch.Tensor], seed: int) -> list[ClientUpdate]:
    """Clients that trained B and the head only, A being the global one."""
    return [
        ClientUpdate(
            u.node_id,
            {k: v for k, v in u.state.items() if ".lora_A." not in k},
            u.num_examples,
            u.scale,
        )
        for u in updates([4, 4, 4], seed=seed)
    ]


def test_ffa_keeps_a_bit_identical_and_averages_the_products() -> None:
    aggregator = FfaAggregator(2.0)
    state = adapter(4, 0)
    frozen = {k: v.clone() for k, v in state.items() if ".lora_A." in k}
    assert sorted(aggregator.wire_keys(state)) == sorted(set(state) - set(frozen))
    for round_ in range(4):
        ups = ffa_updates(state, seed=10 * round_)
        result = aggregator.aggregate(state, ups)
        for prefix, (a_key, b_key) in lora_pairs(state).items():
            assert torch.equal(result.state[a_key], frozen[a_key])
            torch.testing.assert_close(result.state[b_key].double(), mean_of(ups, b_key))
            truth = sum(
                w * u.scale * u.state[b_key].double() @ state[a_key].double()
                for w, u in zip(weights(ups), ups, strict=True)
            )
            assert rel(global_product(result.state, prefix, 2.0), truth) < 1e-6
        state = result.state


def test_ffa_rejects_lora_a_in_an_update() -> None:
    state = adapter(4, 0)
    ups = [*ffa_updates(state, 1), ClientUpdate(5, adapter(4, 3), 10, 2.0)]
    with pytest.raises(AdapterError, match="ffa: node 5 sent lora_A tensors; A is frozen"):
        FfaAggregator(2.0).aggregate(state, ups)


def test_ffa_serves_only_the_frozen_rank_and_rescales_b() -> None:
    aggregator, state = FfaAggregator(2.0), adapter(4, 0)
    with pytest.raises(AdapterError, match="rank 8 cannot share the frozen A of rank 4"):
        aggregator.for_client(state, 8, 2.0)
    sent = aggregator.for_client(state, 4, 1.0)
    for prefix, (a_key, _) in lora_pairs(state).items():
        assert sent[a_key] is state[a_key]
        torch.testing.assert_close(global_product(sent, prefix, 1.0), global_product(state, prefix, 2.0))


# validation shared by all


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda s: s.pop(HEAD), f"node 1: missing key {HEAD}"),
        (lambda s: s.update(extra=torch.zeros(1)), "node 1: unexpected key extra"),
        (lambda s: s[HEAD].__setitem__((0, 0), float("nan")), f"node 1: {HEAD} has non-finite"),
    ],
)
def test_malformed_updates_name_node_and_key(break_it, message: str) -> None:
    ups = updates([4, 4])
    break_it(ups[1].state)
    with pytest.raises(AdapterError, match=message):
        ExactAggregator(2.0).aggregate(adapter(4, 0), ups)


def test_updates_without_examples_are_rejected() -> None:
    ups = [ClientUpdate(u.node_id, u.state, 0, u.scale) for u in updates([4, 4])]
    with pytest.raises(AdapterError, match="no examples"):
        FedAvgAggregator(2.0).aggregate(adapter(4, 0), ups)


def test_exact_with_known_starts_does_not_drift_without_training() -> None:
    """Mixed ranks: clients that change nothing leave the global product where it was (averaging
    the clients' *changes*), where averaging their truncated products would pull it down."""
    global_state = adapter(16, 0)
    agg = ExactAggregator(2.0)
    ups = []
    for node, rank in enumerate([4, 8, 16]):
        start = agg.for_client(global_state, rank, 2.0)
        ups.append(ClientUpdate(node, {k: v.clone() for k, v in start.items()}, 10, 2.0, start=start))
    result = agg.aggregate(global_state, ups)
    for a_key, b_key in lora_pairs(global_state).values():
        before = product(global_state[a_key].double(), global_state[b_key].double(), 2.0)
        after = product(result.state[a_key].double(), result.state[b_key].double(), 2.0)
        assert relative_error(before, after) < 1e-5
    naive = agg.aggregate(global_state, [replace(u, start=None) for u in ups])
    a_key, b_key = next(iter(lora_pairs(global_state).values()))
    before = product(global_state[a_key].double(), global_state[b_key].double(), 2.0)
    drifted = product(naive.state[a_key].double(), naive.state[b_key].double(), 2.0)
    assert relative_error(before, drifted) > 0.05


def test_mixed_ranks_starting_from_an_untrained_adapter_fit_the_global_rank() -> None:
    """Round 1: clients of ranks 4/8/16 truncate the untrained global adapter (B zero) and train B.
    Their starts share the global A's rows, so the mean of their changes has rank 16 and the
    global rank-16 adapter holds it exactly: nothing learned in round 1 is cut. (Layers of 48
    features, so that rows of the clients' own would not fit in 16.)"""
    g = torch.Generator().manual_seed(7)
    global_state = {}
    for prefix in LAYERS:
        global_state[f"{prefix}.lora_A.weight"] = (torch.rand(16, 48, generator=g) * 2 - 1) / 48**0.5
        global_state[f"{prefix}.lora_B.weight"] = torch.zeros(40, 16)
    agg = ExactAggregator(1.0)
    ups = []
    for node, rank in enumerate([4, 8, 16, 8, 4]):
        start = agg.for_client(global_state, rank, 16 / rank)
        trained = {
            k: v + torch.randn(v.shape, generator=g) if ".lora_B." in k else v for k, v in start.items()
        }
        ups.append(ClientUpdate(node, trained, 10 * (node + 1), 16 / rank, start=start))
    result = agg.aggregate(global_state, ups)
    assert result.metrics["residual/mean"] < 1e-5
    for prefix in LAYERS:
        torch.testing.assert_close(
            global_product(result.state, prefix, 1.0), mean_of_products(ups, prefix), rtol=1e-5, atol=1e-5
        )


# what the strategy bounds before aggregating


@pytest.mark.parametrize(
    ("claims", "max_examples", "share", "expected"),
    [
        ([10, 20, 30], None, 1.0, [10, 20, 30]),  # no cap: the claims
        ([10, 10, 10, 1e12], None, 0.5, [10, 10, 10, 30]),  # the huge claim weighs half
        ([10, 1000], None, 0.5, [1, 1]),  # two replies at 0.5: equal
        ([5, 1e12, 1e12, 5, 10], None, 0.3, [5, 15, 15, 5, 10]),  # two capped at one common level
        ([10, 500, 1e9], 100, 1.0, [10, 100, 100]),  # absolute cap
        ([3, 7, 1e6], 1, 1.0, [1, 1, 1]),  # max_examples 1: equal weights
        ([42.0], None, 0.5, [1]),  # one reply takes it all, whatever the cap
    ],
)
def test_bounded_weights(claims, max_examples, share, expected) -> None:
    got = bounded_weights(claims, max_examples, share)
    total = sum(got)
    assert [g / total for g in got] == pytest.approx([e / sum(expected) for e in expected])
    assert max(got) / total <= share + 1e-12 or len(got) * share <= 1


def test_weight_change_norm_sees_the_product_not_the_factors() -> None:
    start = adapter(4, 0)
    same_product = dict(start)
    for a_key, b_key in lora_pairs(start).values():
        same_product[a_key], same_product[b_key] = start[a_key] * 10, start[b_key] / 10
    assert weight_change_norm(start, same_product, 2.0) < 1e-5  # float32 rounding of the factors
    moved = {**start, HEAD: start[HEAD] + 1}
    assert weight_change_norm(start, moved, 2.0) == pytest.approx(6.0)  # a 3x12 head, each +1
    prefix = LAYERS[0]
    a_key, b_key = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
    grown = {**start, b_key: start[b_key] * 2}
    change = global_product(grown, prefix, 1e6) - global_product(start, prefix, 1e6)
    assert weight_change_norm(start, grown, 1e6) == pytest.approx(float(torch.linalg.matrix_norm(change)))
