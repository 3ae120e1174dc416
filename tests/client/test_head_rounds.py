"""Head rounds at the institution: Opacus' clipped head-gradient sum against a per-example loop, the
ledger entry of every round charged before a row is read and composed with round 0 (re-derived by an
accountant of our own), and the ClientApp's reply: one flat vector the audit mod lets leave."""

from __future__ import annotations

import pytest
import torch
from opacus.accountants import create_accountant
from torch import nn

from fedlora.client import head_rounds as H
from fedlora.client.app import ClientSetup, handle_train
from fedlora.client.head_rounds import clipped_gradient_sum, head_parameters, head_round
from fedlora.client.ledger import STATISTICS_ROUND, PrivacyLedger
from fedlora.client.statistics import pooled_features, release_statistics
from fedlora.client.trainer import privacy_plan
from fedlora.common import protocol as P
from fedlora.common.codec import check_outgoing, parse_head_gradient_reply
from fedlora.common.config import config_from_dict
from fedlora.common.head_gradient import CLIP, flat, length
from fedlora.common.model import build_model
from helpers.messages import train_message

CPU = torch.device("cpu")
LABELS = ("a", "b", "c")
EPSILON, ROUNDS = 8.0, 3


def per_example_loop(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, clip: float):
    """Each row's gradient by autograd on its own, clipped as Opacus clips (C / (norm + 1e-6), at most 1)."""
    total = torch.zeros(weight.numel() + bias.numel(), dtype=torch.float64)
    norms = []
    for xi, yi in zip(x, y, strict=True):
        w = weight.clone().double().requires_grad_(True)
        b = bias.clone().double().requires_grad_(True)
        loss = nn.functional.cross_entropy((xi.double() @ w.T + b)[None], yi[None])
        gw, gb = torch.autograd.grad(loss, (w, b))
        g = flat(gw, gb)
        norms.append(float(g.norm()))
        total += g * min(1.0, clip / (float(g.norm()) + 1e-6))
    return total, norms


def test_opacus_clipped_head_gradient_sum_equals_a_per_example_loop():
    gen = torch.Generator().manual_seed(0)
    x = nn.functional.normalize(torch.randn(40, 6, generator=gen), dim=-1)
    y = torch.randint(0, 3, (40,), generator=gen)
    weight, bias = 3 * torch.randn(3, 6, generator=gen), torch.randn(3, generator=gen)
    clip = 0.5
    summed = clipped_gradient_sum(x, y, weight, bias, clip)
    expected, norms = per_example_loop(x, y, weight, bias, clip)
    assert min(norms) < clip < max(norms)  # some rows clipped, some not
    assert summed.shape == (length(3, 6),)
    assert torch.allclose(summed.double(), expected, atol=1e-5)


def independent(history, delta):
    accountant = create_accountant("prv")
    accountant.history = list(history)
    return accountant.get_epsilon(delta=delta)


def head_config(make_config, tmp_path, peers: int = 1500):
    """tiny-bert with many peers and a compute cap that leaves LoRA a few rows a step: the planner's
    LoRA signal-to-noise is below its threshold, the head's clears its own."""
    return make_config(
        {
            "training": {"peers_per_round": peers, "examples_per_round": 3},
            "privacy": {
                "epsilon": EPSILON,
                "planned_rounds": ROUNDS,
                "ledger_path": str(tmp_path / "ledger.json"),
            },
        }
    )


def test_every_head_round_is_charged_before_a_row_is_read_and_composes_with_round_0(
    make_config, vocab_size, toy_classification, tmp_path, monkeypatch
):
    cfg = head_config(make_config, tmp_path)
    delta = cfg.privacy.delta
    data = toy_classification(64, 3)
    model = build_model(cfg.model, LABELS, vocab_size).model
    ledger = PrivacyLedger(tmp_path / "ledger.json", EPSILON, delta, "prv")
    plan = privacy_plan(cfg, model, data, ledger)
    recipe = plan.recipe
    assert recipe.head_rounds.value and not recipe.fine_tune.value
    sigma = recipe.statistics_noise.value
    assert sigma == recipe.noise_multiplier.value == plan.noise_multiplier
    clip = plan.cfg.privacy.max_grad_norm
    _, _, _, entry = release_statistics(model, data, recipe, ledger, CPU, 16, ROUNDS)
    assert (entry.round, entry.noise_multiplier, entry.sample_rate, entry.steps) == (
        STATISTICS_ROUND,
        sigma,
        1.0,
        1,
    )

    seen = []
    real = H.pooled_features

    def reading(*args, **kwargs):
        seen.append([e.round for e in PrivacyLedger(tmp_path / "ledger.json", EPSILON, delta, "prv").entries])
        return real(*args, **kwargs)

    monkeypatch.setattr(H, "pooled_features", reading)
    exact = clipped_gradient_sum(*pooled_features(model, data, CPU, 16), *head_parameters(model), clip)
    for server_round in range(1, ROUNDS + 1):
        released = head_round(model, data, ledger, server_round, clip, CPU, 16)
        assert seen[-1][-1] == server_round  # on disk before the rows were read
        e = released.entry
        assert (e.round, e.noise_multiplier, e.sample_rate, e.steps, e.federated) == (
            server_round,
            sigma,
            1.0,
            1,
            True,
        )
        assert e.epsilon == pytest.approx(independent([(sigma, 1.0, 1 + server_round)], delta), abs=1e-6)
        assert released.noise_std == pytest.approx(sigma * clip)
        assert not torch.allclose(released.vector, exact)  # noise was added
    assert EPSILON - 0.05 <= ledger.spent <= EPSILON  # round 0 and the planned rounds spend the budget
    # Without a ledger (privacy off) the exact clipped sum leaves.
    assert torch.equal(head_round(model, data, None, 9, clip, CPU, 16).vector, exact)


def test_the_client_app_answers_a_round_with_one_head_gradient_vector_the_audit_lets_leave(tmp_path):
    settings = {
        "model": {"source": "tiny-bert"},
        "data": {"max_length": 16},
        "training": {"device": "cpu", "peers_per_round": 1500, "examples_per_round": 3},
        "privacy": {"accountant": "rdp", "epsilon": EPSILON, "planned_rounds": ROUNDS},
        "simulation": {"num_clients": 2},
    }
    cfg = config_from_dict(settings, source="<test>", persona="simulation")
    ledger = tmp_path / "ledger.json"
    setup = ClientSetup(cfg, client_id=0, ledger_path=ledger)
    msg = train_message(cfg, 1)
    reply = handle_train(msg, setup)
    check_outgoing(reply.content, "train")
    fingerprint = msg.content[P.CONFIG][P.FINGERPRINT]
    classes, width = 8, 32  # drug-review triage on tiny-bert
    parsed = parse_head_gradient_reply(reply.content, fingerprint, length(classes, width))
    assert parsed.metrics.steps == 1 and parsed.metrics.noise_std > 0
    assert P.NUM_EXAMPLES not in reply.content[P.METRICS]  # no row count leaves
    entries = PrivacyLedger(ledger, EPSILON, cfg.privacy.delta, "rdp").entries
    assert [(e.round, e.sample_rate, e.steps) for e in entries] == [(1, 1.0, 1)]
    assert parsed.metrics.epsilon == pytest.approx(entries[-1].epsilon)
    assert parsed.metrics.noise_std == pytest.approx(entries[-1].noise_multiplier * CLIP)  # the planned clip
