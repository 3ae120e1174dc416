"""The head-rounds benchmark's noise modes (benchmarks/head_rounds.py) on a tiny cached feature set:
every mode runs on the same seeds, and the noise each draws, on the release and on every round's
gradient, is what it claims (distributed shares add up to the central variance, local noise is K
times it, the curator draws once)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import head_rounds
from fedlora.client.recipe import head_noise
from fedlora.common.head_gradient import CLIP
from fedlora.common.protocol import STATISTICS_SENSITIVITY

INSTITUTIONS, CLASSES, WIDTH, ROUNDS = 4, 3, 8, 2


@pytest.fixture
def cache(tmp_path):
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(CLASSES, WIDTH, generator=gen) * 3
    y = torch.arange(160) % CLASSES
    x = centres[y] + torch.randn(160, WIDTH, generator=gen)
    torch.save((x[:120], y[:120], x[120:], y[120:], CLASSES), tmp_path / "triage.pt")
    torch.save(centres.clone(), tmp_path / "triage-start.pt")
    return tmp_path


def test_each_mode_draws_its_noise_on_release_and_rounds_on_paired_seeds(cache, monkeypatch, capsys):
    releases: list[tuple[str, float]] = []
    gradients: list[tuple[str, float]] = []
    mode_of = {"now": ""}
    real_release, real_noisy, real_federated = (
        head_rounds.gaussian_release,
        head_rounds.noisy,
        head_rounds.federated,
    )

    def federated(parts, start, classes, sigma, rounds, lr, mode="local"):
        mode_of["now"] = mode
        return real_federated(parts, start, classes, sigma, rounds, lr, mode)

    def release(sums, counts, std):
        releases.append((mode_of["now"], std))
        return real_release(sums, counts, std)

    def noisy(value, std):
        assert value.shape == (CLASSES * (WIDTH + 1),)
        gradients.append((mode_of["now"], std))
        return real_noisy(value, std)

    monkeypatch.setattr(head_rounds, "federated", federated)
    monkeypatch.setattr(head_rounds, "gaussian_release", release)
    monkeypatch.setattr(head_rounds, "noisy", noisy)
    monkeypatch.setattr(head_rounds.report, "_width", 300)  # one table row a line
    argv = ["--sets", "triage", "--seeds", "2", "--epsilons", "2", "--rounds", str(ROUNDS), "--lrs", "2"]
    argv += ["--institutions", str(INSTITUTIONS), "--noise", *head_rounds.MODES, "--cache", str(cache)]
    assert head_rounds.main(argv) == 0

    sigma = head_noise(head_rounds.institution(1, 2.0, ROUNDS, 1, 1))
    whole = head_noise(head_rounds.institution(1, 2.0, 0, 1, 1))
    # The releases: statistics only at the whole budget's sigma, then round 0 of head rounds at the
    # shared one; the rounds' gradients always at the shared one.
    for drawn, sensitivity, sigmas in (
        (releases, STATISTICS_SENSITIVITY, (whole, sigma)),
        (gradients, CLIP, (sigma,)),
    ):
        by_mode = {m: [s for mode, s in drawn if mode == m] for m in head_rounds.MODES}
        local, shared, central = by_mode["local"], by_mode["distributed"], by_mode["central"]
        # Every mode makes the same calls per seed (statistics only, the validation run, the run),
        # K vectors each for the institutions' modes, one for the curator.
        assert len(local) == len(shared) == INSTITUTIONS * len(central) > 0
        assert {round(s / sensitivity, 9) for s in local + central} == {round(s, 9) for s in sigmas}
        for k in range(0, len(shared), INSTITUTIONS):
            assert len(set(shared[k : k + INSTITUTIONS])) == 1
            assert math.fsum(s * s for s in shared[k : k + INSTITUTIONS]) == pytest.approx(
                local[k] ** 2, rel=1e-9
            )
            assert local[k] == pytest.approx(central[k // INSTITUTIONS])
    # Rounds' gradients: every institution each round of the validation run and the run, per seed.
    assert len([s for mode, s in gradients if mode == "central"]) == 2 * 2 * ROUNDS
    out = capsys.readouterr().out
    for row in ("distributed head rounds - local statistics only", "distributed head rounds - central"):
        assert row in out
    assert "the sum's noise" in out and "s wall" in out


def test_local_and_distributed_share_the_standard_normals_of_a_seed(cache):
    x, y, _, _, classes = head_rounds.features("triage", cache)
    parts = [(x[i::INSTITUTIONS], y[i::INSTITUTIONS]) for i in range(INSTITUTIONS)]
    start = head_rounds.public_start("triage", cache)
    heads = {}
    for mode in ("local", "distributed"):
        torch.manual_seed(7)
        heads[mode] = head_rounds.federated(parts, start, classes, 0.0, 1, 2.0, mode)[1]
    # No noise: the modes are the same computation.
    for a, b in zip(heads["local"], heads["distributed"], strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(7)
    noisy_local = head_rounds.federated(parts, start, classes, 3.0, 1, 2.0, "local")[1]
    torch.manual_seed(7)
    noisy_shared = head_rounds.federated(parts, start, classes, 3.0, 1, 2.0, "distributed")[1]
    assert not torch.equal(noisy_local[0], noisy_shared[0])
    # The shares carry 1/sqrt(K) of the noise: closer to the noiseless head than local noise is.
    assert (noisy_shared[0] - heads["local"][0]).norm() < (noisy_local[0] - heads["local"][0]).norm()
