"""Statistics first: each institution's DP release of class sums and counts (its sensitivity, its
ledger entry re-derived by an accountant of our own and composed with the rounds), the server's head
from the summed releases, and why summing beats averaging per-institution heads under label skew."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from flwr.app import ArrayRecord
from opacus.accountants import create_accountant
from opacus.optimizers.optimizer import _generate_noise
from torch import nn

from benchmarks.stats_head import averaged_heads
from fedlora.client import app as client_app
from fedlora.client import recipe as R
from fedlora.client.app import ClientSetup, handle_train
from fedlora.client.ledger import STATISTICS_ROUND, PrivacyLedger
from fedlora.client.statistics import class_sums, gaussian_release, head_rows, release_statistics
from fedlora.client.trainer import LocalTrainer, privacy_plan
from fedlora.common import protocol as P
from fedlora.common.accounting import calibrate_noise
from fedlora.common.adapter import adapter_state, from_record, peft_module
from fedlora.common.codec import TrainMetrics, check_outgoing, statistics_reply
from fedlora.common.config import config_from_dict
from fedlora.common.data import TokenizedDataset, with_units
from fedlora.common.model import build_model
from fedlora.server.statistics_head import class_mean_head, cosine_shrinkage, summed
from fedlora.server.strategy import build_strategy
from helpers.messages import reply_message, train_message

CPU = torch.device("cpu")
LABELS = ("a", "b", "c")
EPSILON, ROUNDS, STEPS, BATCH = 8.0, 2, 2, 8


def test_one_row_moves_the_released_sums_and_counts_by_sqrt_2(make_config, vocab_size, toy_classification):
    cfg = make_config()
    model = build_model(cfg.model, LABELS, vocab_size).model
    data = toy_classification(12, 3)
    assert head_rows(model) == 3
    sums, counts = class_sums(model, data, 3, CPU, 5)
    assert counts.tolist() == [4.0, 4.0, 4.0]
    for row in (0, 7):
        rest = data.subset([i for i in range(len(data)) if i != row])
        fewer, fewer_counts = class_sums(model, rest, 3, CPU, 5)
        moved = torch.cat([(sums - fewer).flatten(), counts - fewer_counts]).norm().item()
        assert moved == pytest.approx(math.sqrt(2), abs=1e-6)  # a unit vector and a count of 1
    assert model.training  # restored after the eval-mode pass


def joined(*parts: TokenizedDataset) -> TokenizedDataset:
    """Datasets of one width, their rows one after another, each row's person kept."""
    fields = ("input_ids", "attention_mask", "labels", "units")
    return TokenizedDataset(*(torch.cat([getattr(d, f) for d in parts]) for f in fields))


def flat_release(model, data, cfg, units) -> torch.Tensor:
    """The exact release (no ledger: noise 0) as one vector, sums then counts."""
    recipe = privacy_plan(cfg, model, data, None).recipe
    sums, counts, noise_std, _ = release_statistics(model, data, recipe, None, CPU, 16, 1, units=units)
    assert noise_std == 0.0
    return torch.cat([sums.flatten(), counts]).double()


def test_one_person_with_many_rows_moves_the_released_sums_and_counts_by_at_most_sqrt_2(
    make_config, vocab_size, toy_classification
):
    """A person's 50 rows, all in one class, added to 12 persons of 2 rows each (one with rows in two
    classes): per person (each person's rows averaged) the release moves by at most sqrt(2), as one
    row's does; the per-row release of the same rows moves by more than 50 (its counts alone)."""
    cfg = make_config({"privacy": {"enabled": False}})
    model = build_model(cfg.model, LABELS, vocab_size).model
    others = with_units(toy_classification(24, 3, seed=4), torch.arange(24) // 2)
    ones = toy_classification(150, 3, seed=5)
    heavy = ones.subset([i for i in range(150) if ones.labels[i] == 0])
    heavy = with_units(heavy, torch.full((50,), 99))
    both = joined(others, heavy)
    with_person = flat_release(model, both, cfg, both.units)
    without = flat_release(model, others, cfg, others.units)
    moved = float((with_person - without).norm())
    assert 1.0 < moved <= math.sqrt(2) + 1e-9
    counts = with_person[-3:] - without[-3:]
    assert counts.tolist() == pytest.approx([1.0, 0.0, 0.0])  # one person, in the class of all their rows
    assert float(without[-3:].sum()) == pytest.approx(12.0)  # persons, fractionally per class
    per_row = float((flat_release(model, both, cfg, None) - flat_release(model, others, cfg, None)).norm())
    assert per_row > 50


def independent(history, delta):
    accountant = create_accountant("prv")
    accountant.history = list(history)
    return accountant.get_epsilon(delta=delta)


def test_the_release_is_charged_at_round_0_and_composed_with_the_rounds(
    make_config, vocab_size, toy_classification, tmp_path
):
    ledger_path = tmp_path / "ledger.json"
    cfg = make_config(
        {
            "training": {"batch_size": BATCH, "local_steps": STEPS},
            "privacy": {"epsilon": EPSILON, "planned_rounds": ROUNDS, "ledger_path": str(ledger_path)},
        }
    )
    delta = cfg.privacy.delta
    data = toy_classification(64, 3)
    model = build_model(cfg.model, LABELS, vocab_size).model
    ledger = PrivacyLedger(ledger_path, EPSILON, delta, "prv")
    recipe = privacy_plan(cfg, model, data, ledger).recipe
    sigma_s = recipe.statistics_noise.value
    assert sigma_s == calibrate_noise(0.25 * EPSILON, delta, "prv", 1.0, 1)
    sums, counts, noise_std, entry = release_statistics(model, data, recipe, ledger, CPU, 16, ROUNDS)
    assert noise_std == pytest.approx(sigma_s * math.sqrt(2))
    assert (entry.round, entry.noise_multiplier, entry.sample_rate, entry.steps) == (
        STATISTICS_ROUND,
        sigma_s,
        1.0,
        1,
    )
    assert entry.epsilon == pytest.approx(independent([(sigma_s, 1.0, 1)], delta), abs=1e-6)
    exact, exact_counts = class_sums(model, data, 3, CPU, 16)
    assert not torch.allclose(sums.double(), exact)  # noise was added
    assert (counts.double() - exact_counts).abs().max() < 10 * noise_std

    # The rounds after it: noise calibrated so that the release and every planned step spend the budget.
    trainer = LocalTrainer(cfg, model, data, CPU, PrivacyLedger(ledger_path, EPSILON, delta, "prv"))
    first = trainer.train_round(1)
    last = trainer.train_round(2)
    rounds = (trainer.noise_multiplier, trainer.sample_rate, STEPS)
    assert first.epsilon == pytest.approx(independent([(sigma_s, 1.0, 1), rounds], delta), abs=1e-6)
    both = [(sigma_s, 1.0, 1), (rounds[0], rounds[1], STEPS * ROUNDS)]
    assert last.epsilon == pytest.approx(independent(both, delta), abs=1e-6)
    assert EPSILON - 0.05 <= last.epsilon <= EPSILON
    assert [e.round for e in trainer.ledger.entries] == [STATISTICS_ROUND, 1, 2]
    trainer.close()


def test_without_noise_the_server_s_head_is_the_head_of_the_exact_summed_statistics(
    make_config, vocab_size, toy_classification
):
    cfg = make_config({"privacy": {"enabled": False}, "model": {"head_init": "label-names"}})
    built = build_model(cfg.model, LABELS, vocab_size)
    model = built.model
    parts = [toy_classification(n, 3, seed=s) for n, s in ((9, 1), (15, 2), (6, 3))]
    replies = []
    for node, data in enumerate(parts, start=1):
        recipe = privacy_plan(cfg, model, data, None).recipe
        sums, counts, noise_std, entry = release_statistics(model, data, recipe, None, CPU, 4, 1)
        assert (noise_std, entry) == (0.0, None)
        metrics = TrainMetrics(len(data), 0.0, cfg.model.lora_r, 2.0, 0, 0.1, noise_std=noise_std)
        content = statistics_reply(sums, counts, metrics, built.fingerprint)
        check_outgoing(content, "train")  # the audit mod lets it leave as it is
        replies.append(reply_message(node, content))
    strategy = build_strategy(cfg, built.fingerprint, 3)
    start = adapter_state(model)
    strategy.set_global(ArrayRecord({k: v.contiguous() for k, v in start.items()}))
    arrays = strategy.aggregate_statistics(replies, cfg.model.head_scale)
    head = {k: torch.from_numpy(a.numpy()) for k, a in arrays.items() if ".classifier." in k}
    weight = next(v for k, v in head.items() if k.endswith(".weight"))
    bias = next(v for k, v in head.items() if k.endswith(".bias"))

    # The head built here from the exact statistics of every row, pooled by hand.
    classifier = peft_module(model).base_model.model.eval()
    with torch.no_grad():
        pooled = [classifier.embed(d.input_ids, d.attention_mask) for d in parts]
    rows = nn.functional.normalize(torch.cat(pooled), dim=-1)
    labels = torch.cat([d.labels for d in parts])
    means = torch.stack([rows[labels == c].sum(0) for c in range(3)])
    shares = torch.bincount(labels, minlength=3).float() / len(labels)
    assert torch.allclose(weight, cfg.model.head_scale * nn.functional.normalize(means, dim=-1), atol=1e-5)
    assert torch.allclose(bias, torch.log(shares), atol=1e-6)
    # Everything but the head is the global adapter as it was.
    assert all(torch.equal(torch.from_numpy(arrays[k].numpy()), v) for k, v in start.items() if k not in head)


def unit_rows(direction: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    return nn.functional.normalize(direction + 0.002 * torch.randn(n, len(direction), generator=gen), dim=-1)


def test_summed_statistics_beat_averaged_heads_where_per_institution_heads_provably_collapse():
    """Two classes whose mean directions are 0.05 rad apart (as MiniLM's class means are close):
    the cosine can move a logit by at most head_scale x ||w0 - w1||. Two institutions hold 99 rows
    of class 0 and 1 of class 1, the third 2 and 198: the averaged log-shares favour class 0 by more
    than any cosine can undo, so the averaged head predicts class 0 for every input (checked by that
    bound, and on the test rows); the summed statistics are balanced, and their head separates."""
    gen = torch.Generator().manual_seed(0)
    width, scale = 8, 20.0
    base = torch.zeros(width)
    base[0] = 1.0
    directions = [base.clone(), base.clone()]
    directions[0][1], directions[1][2] = math.sin(0.05 / math.sqrt(2)), math.sin(0.05 / math.sqrt(2))
    holdings = [(99, 1), (99, 1), (2, 198)]
    releases = []
    for counts in holdings:
        sums = torch.stack([unit_rows(directions[c], n, gen).sum(0) for c, n in enumerate(counts)])
        releases.append((sums.double(), torch.tensor(counts, dtype=torch.float64)))
    test_x = torch.cat([unit_rows(directions[c], 100, gen) for c in (0, 1)])
    test_y = torch.tensor([0] * 100 + [1] * 100)

    avg_w, avg_b = averaged_heads(releases, scale)
    bound = float((avg_w[0] - avg_w[1]).norm())  # |(w0 - w1) . x| <= ||w0 - w1|| for a unit x
    assert avg_b[0] - avg_b[1] > bound  # the prior outvotes every possible cosine: a proof of collapse
    averaged = (test_x @ avg_w.T + avg_b).argmax(1)
    assert (averaged == 0).all()

    weight, bias = class_mean_head(*summed(releases), scale)
    predicted = (test_x @ weight.T + bias).argmax(1)
    assert float((predicted == test_y).float().mean()) >= 0.95
    assert float((averaged == test_y).float().mean()) == 0.5


def released(directions: torch.Tensor, n: int, noise_std: float, gen: torch.Generator):
    """Summed class sums and counts of ``n`` unit rows per class, with Gaussian noise of ``noise_std``."""
    sums = torch.stack([unit_rows(d, n, gen).sum(0) for d in directions]).double()
    counts = torch.full((len(directions),), float(n), dtype=torch.float64)
    return sums + noise_std * torch.randn(sums.shape, generator=gen, dtype=torch.float64), counts


def test_the_start_weighs_what_the_release_says_not_a_constant():
    """Pure-noise sums (5 rows a class, noise 54 x their norm): the head keeps the label names'
    directions; plentiful sums and label names that point at the wrong classes: the head follows the
    data. Neither case needs a tuned weight: both come from the release's own noise and spread."""
    gen = torch.Generator().manual_seed(3)
    width, scale = 32, 20.0
    common = nn.functional.normalize(torch.ones(width), dim=0)
    directions = nn.functional.normalize(common + 0.6 * torch.eye(width)[:3], dim=-1)
    rows = torch.cat([unit_rows(d, 50, gen) for d in directions])
    truth = torch.arange(3).repeat_interleave(50)

    noise_std = 3.0 * math.sqrt(10)  # ten institutions' releases summed
    sums, counts = released(directions, 5, noise_std, gen)
    weight, _ = class_mean_head(sums, counts, scale, directions * scale, noise_std**2)
    cosines = (nn.functional.normalize(weight.double(), dim=-1) * directions.double()).sum(1)
    assert float(cosines.min()) > 0.98

    sums, counts = released(directions, 400, 1.0, gen)
    wrong = directions.roll(1, dims=0)
    weight, bias = class_mean_head(sums, counts, scale, wrong * scale, 1.0)
    predicted = (rows.double() @ weight.double().T + bias.double()).argmax(1)
    assert float((predicted == truth).double().mean()) >= 0.95


def test_the_release_draws_opacus_secure_mode_noise_from_the_generator_it_is_given():
    """privacy.secure_mode hands the release Opacus' secure generator: its noise is then exactly
    Opacus' secure-mode noise (four draws per value) from that generator, not torch's global one."""
    sums, counts = torch.zeros(3, 5, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    torch.manual_seed(0)
    noisy_sums, noisy_counts = gaussian_release(sums, counts, 2.0, torch.Generator().manual_seed(7))
    same = torch.Generator().manual_seed(7)
    assert torch.equal(noisy_sums, _generate_noise(2.0, sums, same, secure_mode=True).double())
    assert torch.equal(noisy_counts, _generate_noise(2.0, counts, same, secure_mode=True).double())
    torch.manual_seed(0)
    again, _ = gaussian_release(sums, counts, 2.0, torch.Generator().manual_seed(8))
    assert not torch.equal(noisy_sums, again)  # the generator given decides, not torch's seed


def test_an_institution_whose_planner_skips_lora_answers_a_round_with_an_empty_update(tmp_path, monkeypatch):
    """The planner's no-LoRA decision for 53 rows (client.recipe), as the ClientApp meets it in a LoRA
    round: a zero delta of every sent key, 0 steps, nothing trained and nothing spent."""
    settings = {
        "model": {"source": "tiny-bert"},
        "data": {"max_length": 32},
        "training": {"device": "cpu", "peers_per_round": 10},
        "privacy": {"accountant": "rdp", "epsilon": 8.0},
        "simulation": {"num_clients": 2},
    }
    cfg = config_from_dict(settings, source="<test>", persona="simulation")
    skip = R.plan(R.facts(cfg, 53, 8, trainable=75_000), cfg)
    assert skip.fine_tune.value is False
    real = client_app.privacy_plan
    monkeypatch.setattr(
        client_app, "privacy_plan", lambda *a, **k: dataclasses.replace(real(*a, **k), recipe=skip)
    )
    ledger = tmp_path / "ledger.json"
    setup = ClientSetup(cfg, client_id=0, ledger_path=ledger)
    reply = handle_train(train_message(cfg, 1), setup)
    update = from_record(reply.content[P.ARRAYS])
    assert update and all(not v.any() for v in update.values())
    assert reply.content[P.METRICS][P.STEPS] == 0 and reply.content[P.METRICS][P.EPSILON] == 0.0
    assert not ledger.exists() or '"round": 1' not in ledger.read_text()


def test_a_small_class_s_noisy_direction_is_corrected_for_its_shrinkage():
    """A class of 12 rows beside two of 400, with noise in 64 dimensions: its noisy unit direction
    scores its own rows lower than the large classes' directions do (its cosine shrunk by the
    noise), so a head of unit directions never predicts it (recall 0 on every seed before the
    correction). Corrected for the expected shrinkage, its rows are found again; without noise the
    head is the exact nearest class mean."""
    width, scale, noise_std, holdings = 64, 20.0, 2.0, (400, 400, 12)
    common = nn.functional.normalize(torch.ones(width), dim=0)
    directions = nn.functional.normalize(common + 0.5 * torch.eye(width)[:3], dim=-1)
    recalls = []
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)

        def rows(direction: torch.Tensor, n: int, gen: torch.Generator = gen) -> torch.Tensor:
            return nn.functional.normalize(direction + 0.05 * torch.randn(n, width, generator=gen), dim=-1)

        sums = torch.stack([rows(d, n).sum(0) for d, n in zip(directions, holdings, strict=True)]).double()
        counts = torch.tensor(holdings, dtype=torch.float64)
        noisy = sums + noise_std * torch.randn(sums.shape, generator=gen, dtype=torch.float64)
        names = directions + 0.3 * torch.randn(3, width, generator=gen)
        start = nn.functional.normalize(names, dim=-1) * scale
        weight, bias = class_mean_head(noisy, counts, scale, start, noise_std**2)
        shrinkage = cosine_shrinkage(noisy, noise_std**2)
        assert float(shrinkage[2]) < 0.9 < float(shrinkage[:2].min())
        own = rows(directions[2], 200).double()
        recalls.append(float(((own @ weight.double().T + bias.double()).argmax(1) == 2).double().mean()))
        exact, _ = class_mean_head(sums, counts, scale, start, 0.0)
        assert torch.allclose(exact, scale * nn.functional.normalize(sums, dim=-1).float())
    assert sum(recalls) / len(recalls) >= 0.5
