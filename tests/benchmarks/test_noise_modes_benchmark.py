"""The distributed-noise benchmark (benchmarks/distributed_noise.py) on a tiny cached feature set: every
mode is scored on the same seeds, and the noise each mode draws is what it claims (the sum of the
distributed shares has the centralised variance, local noise K times it)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import distributed_noise
from fedlora.common.accounting import calibrate_noise
from fedlora.common.protocol import STATISTICS_SENSITIVITY

INSTITUTIONS, CLASSES, WIDTH = 4, 3, 8


@pytest.fixture
def cache(tmp_path):
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(CLASSES, WIDTH, generator=gen) * 3
    y = torch.arange(120) % CLASSES
    x = centres[y] + torch.randn(120, WIDTH, generator=gen)
    torch.save((x[:90], y[:90], x[90:], y[90:], CLASSES), tmp_path / "triage.pt")
    torch.save(centres.clone(), tmp_path / "triage-start.pt")
    return tmp_path


def test_every_mode_on_paired_seeds_with_the_noise_it_claims(cache, monkeypatch, capsys):
    drawn: list[float] = []
    real = distributed_noise.gaussian_release

    def recorded(sums, counts, std, gen):
        drawn.append(std)
        return real(sums, counts, std, gen)

    monkeypatch.setattr(distributed_noise, "gaussian_release", recorded)
    argv = ["--sets", "triage", "--seeds", "2", "--epsilons", "2", "--institutions", str(INSTITUTIONS)]
    assert distributed_noise.main([*argv, "--cache", str(cache)]) == 0
    full = calibrate_noise(2.0, distributed_noise.DELTA, "prv", 1.0, 1) * STATISTICS_SENSITIVITY
    local, shared = drawn[:INSTITUTIONS], drawn[INSTITUTIONS : 2 * INSTITUTIONS]
    central = drawn[2 * INSTITUTIONS :]
    assert len(drawn) == 2 * (2 * INSTITUTIONS + 1)  # per seed: K local, K shares, one curator
    assert local == [pytest.approx(full)] * INSTITUTIONS and central[:1] == [pytest.approx(full)]
    assert math.fsum(s * s for s in shared) == pytest.approx(full**2)
    out = capsys.readouterr().out
    for row in (*distributed_noise.MODES, "distributed -"):
        assert row in out
