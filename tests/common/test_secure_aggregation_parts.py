"""Secure aggregation's parts: the PRG and its seeds, key agreement, Shamir sharing, quantisation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedlora.common.errors import ConfigError, SecureAggregationError
from fedlora.common.secure_aggregation import keys, prg, shamir
from fedlora.common.secure_aggregation.client import ClientRound
from fedlora.common.secure_aggregation.quantise import Quantiser
from fedlora.common.secure_aggregation.server import ServerRound
from fedlora.common.secure_aggregation.settings import SecAggConfig
from helpers.identities import identities


def bit_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return 1 - np.unpackbits(np.bitwise_xor(a.view(np.uint8), b.view(np.uint8))).mean()


def test_one_seed_bit_changed_gives_unrelated_masks():
    seed = prg.fresh_seed()
    other = bytearray(seed)
    other[13] ^= 0x10
    a, b = prg.expand(seed, 50_000, 32), prg.expand(bytes(other), 50_000, 32)
    assert np.array_equal(a, prg.expand(seed, 50_000, 32))  # deterministic in the seed
    # 1.6M bits: agreement of independent streams is 0.5 +- 0.0004 (1 sd); allow 6 sd
    assert abs(bit_agreement(a, b) - 0.5) < 0.0024
    assert np.count_nonzero(a == b) <= 2  # equal 32-bit words: expected 50,000 / 2^32


def test_one_private_key_bit_changed_gives_unrelated_pairwise_masks():
    mine, peer = keys.X25519PrivateKey.generate(), keys.X25519PrivateKey.generate()
    raw = bytearray(keys.private_bytes(mine))
    raw[9] ^= 0x04  # not a bit X25519 clamps away
    changed = keys.private_key(bytes(raw))
    seed = keys.mask_seed(mine, keys.public_bytes(peer), b"ctx")
    assert seed == keys.mask_seed(peer, keys.public_bytes(mine), b"ctx")  # both ends agree
    other = keys.mask_seed(changed, keys.public_bytes(peer), b"ctx")
    assert abs(bit_agreement(prg.expand(seed, 50_000, 32), prg.expand(other, 50_000, 32)) - 0.5) < 0.0024
    assert keys.mask_seed(mine, keys.public_bytes(peer), b"ctx2") != seed  # rounds never share a mask


def test_seeds_are_at_least_128_bits_fresh_and_shorter_ones_refused():
    identity = identities([1])[1]
    client = ClientRound(1, SecAggConfig(), b"ctx", identity)
    other = ClientRound(1, SecAggConfig(), b"ctx", identity)
    assert len(client._seed) * 8 >= 128 and client._seed != other._seed
    peer = keys.X25519PrivateKey.generate()
    assert len(keys.mask_seed(peer, keys.public_bytes(keys.X25519PrivateKey.generate()), b"")) * 8 >= 128
    with pytest.raises(SecureAggregationError, match="a mask seed must be 32 bytes, got 4"):
        prg.expand(b"\x01\x02\x03\x04", 10, 32)  # Flower's SecAgg+ folds its key into these 32 bits


def test_shamir_any_threshold_shares_reconstruct_and_fewer_are_refused():
    secret = prg.fresh_seed()
    nodes = [3, 2**63 + 5, 77, 1_000_003, 42]
    shares = shamir.split(secret, 3, nodes)
    for chosen in ([3, 77, 42], [2**63 + 5, 1_000_003, 42], nodes):
        assert shamir.combine({n: shares[n] for n in chosen}, 3) == secret
    with pytest.raises(SecureAggregationError, match="2 shares cannot reconstruct a secret of threshold 3"):
        shamir.combine({n: shares[n] for n in nodes[:2]}, 3)


def test_shamir_fewer_than_threshold_shares_reveal_nothing_checkable():
    """t - 1 shares interpolate at 0 to a value unrelated to the secret, and their low bytes are
    uniform whatever the secret (chi-square, false alarm 1e-9 per secret: the shares come from
    secrets, unseedable; at 1e-4 the two checks failed a correct split 1 run in 5,000)."""
    nodes, threshold = [11, 12, 13, 14], 3
    for secret in (bytes(32), b"\xff" * 32):
        low_bytes, guesses = [], set()
        for _ in range(1000):
            shares = shamir.split(secret, threshold, nodes)
            points = {n: int.from_bytes(shares[n], "big") for n in nodes[: threshold - 1]}
            guesses.add(shamir.interpolate_at_zero(points))
            low_bytes += [value & 0xFF for value in points.values()]
        assert int.from_bytes(secret, "big") not in guesses and len(guesses) == 1000
        assert stats.chisquare(np.bincount(low_bytes, minlength=256)).pvalue > 1e-9


def test_sealed_shares_open_only_for_their_receiver_and_refuse_truncation():
    a, b = keys.X25519PrivateKey.generate(), keys.X25519PrivateKey.generate()
    sealed = keys.seal(a, keys.public_bytes(b), b"ctx", 1, 2, b"share")
    assert keys.open_sealed(b, keys.public_bytes(a), b"ctx", 1, 2, sealed) == b"share"
    for context, sender, receiver, text in (
        (b"ctx2", 1, 2, sealed),
        (b"ctx", 2, 1, sealed),
        (b"ctx", 1, 2, b"x"),
    ):
        with pytest.raises(SecureAggregationError, match="fail authentication"):
            keys.open_sealed(b, keys.public_bytes(a), context, sender, receiver, text)


def test_quantisation_round_trip_is_within_its_bound_and_clips():
    quantiser = Quantiser.of(SecAggConfig(clip=4.0, quantisation_bits=16))
    rng = np.random.default_rng(1)
    parts = [rng.uniform(-5, 5, size=10_000) for _ in range(7)]
    total = sum((quantiser.quantise(part) for part in parts), start=np.zeros(10_000, "u4"))
    error = quantiser.dequantise_sum(total, 7) - sum(np.clip(part, -4, 4) for part in parts)
    bound = quantiser.sum_error(7)
    assert np.abs(error).max() <= bound and np.abs(error).max() > bound / 4  # the bound is near tight
    assert quantiser.quantise(np.array([-100.0, 100.0])).tolist() == [0, 2**16 - 1]
    with pytest.raises(SecureAggregationError, match="non-finite"):
        quantiser.quantise(np.array([0.0, np.nan]))


def test_a_sum_that_could_overflow_the_ring_is_refused_in_one_line():
    config = SecAggConfig(quantisation_bits=24)
    config.check_capacity(256)  # 256 x (2^24 - 1) < 2^32
    with pytest.raises(ConfigError, match=r"257 institutions x \(2\^24 - 1\) levels overflow the ring 2\^32; "
                       r"expected quantisation_bits <= 23 or ring_bits: 64"):  # fmt: skip
        config.check_capacity(257)
    top = int(Quantiser.of(config).quantise(np.array([8.0]))[0])
    assert top == 2**24 - 1 and top * 257 >= 2**32  # the refusal is exactly where wrapping could start
    assert 257 * (2**23 - 1) < 2**32  # and the suggested bits fit
    with pytest.raises(ConfigError, match="257 institutions"):
        ServerRound(config, b"ctx", 10, sampled=257)  # a round of that size never starts
