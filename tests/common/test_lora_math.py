"""LoRA factor algebra: pairing, rank, products and their best low-rank re-factorization."""

from __future__ import annotations

import pytest
import torch

from fedlora.common.errors import AdapterError
from fedlora.common.lora_math import (
    dropped_factors,
    factorize,
    layer_products,
    lora_pairs,
    lora_rank,
    product,
    truncate_state,
)

QUERY = "base_model.model.encoder.layer.{}.attention.self.query"
HEAD = "base_model.model.classifier.modules_to_save.default.weight"


def adapter(rank: int, layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        state[f"{QUERY.format(i)}.lora_A.weight"] = torch.randn(rank, 12, generator=g)
        state[f"{QUERY.format(i)}.lora_B.weight"] = torch.randn(10, rank, generator=g)
    state[HEAD] = torch.randn(3, 12, generator=g)
    return state


def best_residual(p: torch.Tensor, rank: int) -> float:
    """||p - best rank-r approximation|| / ||p||, straight from the SVD (Eckart-Young)."""
    u, s, vh = torch.linalg.svd(p.double(), full_matrices=False)
    approx = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    return float(torch.linalg.matrix_norm(p.double() - approx) / torch.linalg.matrix_norm(p))


def test_lora_pairs_maps_layer_prefix_to_keys() -> None:
    pairs = lora_pairs(adapter(4))
    assert pairs == {
        QUERY.format(i): (f"{QUERY.format(i)}.lora_A.weight", f"{QUERY.format(i)}.lora_B.weight")
        for i in range(2)
    }


@pytest.mark.parametrize("drop", ["lora_A", "lora_B"])
def test_lora_pairs_names_the_factor_without_partner(drop: str) -> None:
    state = adapter(4)
    del state[f"{QUERY.format(1)}.{drop}.weight"]
    kept = "lora_B" if drop == "lora_A" else "lora_A"
    with pytest.raises(AdapterError, match=rf"{QUERY.format(1)}\.{kept}\.weight"):
        lora_pairs(state)


def test_lora_pairs_rejects_factors_of_different_rank() -> None:
    state = adapter(4)
    state[f"{QUERY.format(0)}.lora_B.weight"] = torch.randn(10, 5)
    with pytest.raises(AdapterError, match="same r"):
        lora_pairs(state)


def test_lora_rank() -> None:
    assert lora_rank(adapter(6)) == 6
    mixed = {**adapter(4, layers=1), **{k: v for k, v in adapter(8).items() if "layer.1" in k}}
    with pytest.raises(AdapterError, match="disagree"):
        lora_rank(mixed)
    with pytest.raises(AdapterError, match="no LoRA layers"):
        lora_rank({HEAD: torch.zeros(3, 12)})


def test_product_is_scaled_b_times_a() -> None:
    a, b = torch.randn(4, 12), torch.randn(10, 4)
    torch.testing.assert_close(product(a, b, 2.5), 2.5 * b @ a)


def test_factorize_reproduces_a_low_rank_matrix_exactly() -> None:
    p = torch.randn(10, 3, dtype=torch.float64) @ torch.randn(3, 12, dtype=torch.float64)
    a, b, residual = factorize(p, 3, 2.0)
    assert a.shape == (3, 12) and b.shape == (10, 3)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(product(a.double(), b.double(), 2.0), p, rtol=1e-5, atol=1e-5)
    assert residual < 1e-6


def test_factorize_residual_is_the_best_rank_r_residual() -> None:
    p = torch.randn(10, 12)
    a, b, residual = factorize(p, 4, 0.5)
    assert residual == pytest.approx(best_residual(p, 4), rel=1e-5)
    p64, approx = p.double(), product(a.double(), b.double(), 0.5)
    shipped = torch.linalg.matrix_norm(p64 - approx) / torch.linalg.matrix_norm(p64)
    assert float(shipped) == pytest.approx(residual, rel=1e-12)


def test_factorize_splits_singular_values_evenly() -> None:
    a, b, _ = factorize(torch.randn(10, 12), 4, 2.0)
    torch.testing.assert_close(a @ a.T, b.T @ b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("p", "live"),
    [
        (torch.randn(10, 12), 10),  # rank 16 asked of a 10x12 matrix
        (torch.randn(10, 3) @ torch.randn(3, 12), 3),  # rank 3 at float32 precision
        (torch.zeros(10, 12), 0),  # an untrained adapter's product
    ],
    ids=["beyond-the-shape", "low-rank", "zero"],
)
def test_factorize_starts_empty_directions_as_lora_does(p: torch.Tensor, live: int) -> None:
    """Beyond the product's rank B is zero and A a fixed row in PEFT's init range: the product is
    kept, B's gradient there (which goes through A) is not zero as it would be with A zero, and
    every party ships the same A."""
    rank = 16 if live == 10 else 8
    a, b, residual = factorize(p, rank, 1.0)
    assert a.shape == (rank, 12) and b.shape == (10, rank)
    assert residual < 1e-6
    assert not b[:, live:].any()
    assert (a[live:].abs().amax(dim=1) > 0.05).all() and (a[live:].abs() <= 12**-0.5).all()
    assert torch.equal(factorize(p.clone(), rank, 1.0)[0], a)


def test_factorize_is_deterministic() -> None:
    p = torch.randn(10, 12)
    first, second = factorize(p, 4, 2.0), factorize(p.clone(), 4, 2.0)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_factorize_does_not_depend_on_the_svd_sign_convention(monkeypatch) -> None:
    """A client truncating the global adapter and the server reconstructing that start must agree
    bit for bit, even where their LAPACK builds flip the signs of singular pairs differently."""
    p = torch.randn(10, 3) @ torch.randn(3, 12)
    a, b, _ = factorize(p, 4, 2.0)
    svd = torch.linalg.svd

    def flipped(x, full_matrices=True):
        u, s, vh = svd(x, full_matrices=full_matrices)
        signs = torch.tensor([-1.0, 1.0, -1.0] + [1.0] * (s.numel() - 3), dtype=u.dtype)
        return u * signs, s, vh * signs[:, None]

    monkeypatch.setattr(torch.linalg, "svd", flipped)
    a_flipped, b_flipped, _ = factorize(p, 4, 2.0)
    assert torch.equal(a_flipped, a) and torch.equal(b_flipped, b)


def test_factorize_rejects_bad_inputs() -> None:
    with pytest.raises(AdapterError, match="2-D"):
        factorize(torch.randn(10), 4, 1.0)
    with pytest.raises(ValueError, match="rank >= 1"):
        factorize(torch.randn(10, 12), 0, 1.0)


def test_truncate_state_refactorizes_lora_and_keeps_the_rest() -> None:
    state = adapter(8)
    smaller = truncate_state(state, 4, 2.0, 1.0)
    assert smaller[HEAD] is state[HEAD]
    for a_key, b_key in lora_pairs(state).values():
        assert smaller[a_key].shape == (4, 12) and smaller[b_key].shape == (10, 4)
        p = product(state[a_key].double(), state[b_key].double(), 2.0)
        got = product(smaller[a_key].double(), smaller[b_key].double(), 1.0)
        rel = float(torch.linalg.matrix_norm(p - got) / torch.linalg.matrix_norm(p))
        assert rel == pytest.approx(best_residual(p, 4), rel=1e-5)


def test_truncate_state_to_a_higher_rank_keeps_the_product() -> None:
    state = adapter(4)
    larger = truncate_state(state, 8, 4.0, 2.0)
    for a_key, b_key in lora_pairs(state).values():
        assert larger[a_key].shape == (8, 12) and larger[b_key].shape == (10, 8)
        torch.testing.assert_close(
            product(larger[a_key], larger[b_key], 2.0),
            product(state[a_key], state[b_key], 4.0),
            rtol=1e-4,
            atol=1e-4,
        )


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_truncating_an_untrained_adapter_keeps_its_lora_start(rank: int) -> None:
    """B zero (round 1): every rank starts from the received A's own rows, nested, so what clients
    of different ranks learn lies in rows the global adapter holds; beyond its rank, fixed rows."""
    state = adapter(8)
    for _, b_key in lora_pairs(state).values():
        state[b_key] = torch.zeros_like(state[b_key])
    served = truncate_state(state, rank, 2.0, 16 / rank)
    for a_key, b_key in lora_pairs(state).values():
        kept = min(rank, 8)
        assert torch.equal(served[a_key][:kept], state[a_key][:kept]) and not served[b_key].any()
        beyond = served[a_key][kept:]
        assert (beyond.abs() <= 12**-0.5).all() and (beyond.abs().amax(dim=1) > 0.05).all()


def test_a_truncation_and_its_dropped_factors_add_up_to_the_whole_product() -> None:
    state = adapter(8)
    kept = truncate_state(state, 3, 2.0, 4.0)
    dropped = dropped_factors(state, kept, 5, 2.0, 4.0)
    assert set(dropped) == {k for pair in lora_pairs(state).values() for k in pair}  # no head
    for prefix, whole in layer_products(state, 2.0).items():
        a_key, b_key = lora_pairs(state)[prefix]
        assert dropped[a_key].shape == (5, 12) and dropped[b_key].shape == (10, 5)
        parts = product(kept[a_key], kept[b_key], 4.0) + product(dropped[a_key], dropped[b_key], 4.0)
        torch.testing.assert_close(parts.to(torch.float64), whole, rtol=0, atol=1e-5)
        # The dropped part is not negligible, so the sum above is not vacuous.
        assert torch.linalg.matrix_norm(product(dropped[a_key], dropped[b_key], 4.0)) > 0.1
