"""The privacy unit is the person (data.privacy_unit): sampling, grouping, clipping and accounting
per person, checked against brute force and an independent accountant; bad input refused in one line."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from opacus.accountants import create_accountant

from fedlora.client.canaries import CanarySpec, with_input_canaries
from fedlora.client.cli import main as client_main
from fedlora.client.ledger import STATISTICS_ROUND, PrivacyLedger
from fedlora.client.privacy_audit import AUDIT_LEDGER, CANARY_FILE, run_local_audit
from fedlora.client.privacy_unit import PersonRows, unit_counts
from fedlora.client.recipe import facts, plan, poisson_rate
from fedlora.client.trainer import LocalTrainer
from fedlora.common.accounting import calibrate_noise
from fedlora.common.config import config_from_dict
from fedlora.common.data import build_data, with_units
from fedlora.common.errors import CheckpointError, ConfigError, DataError
from fedlora.simulations.partitions import partition
from fedlora.simulations.synthetic_patients import LARGEST, patient_ids
from helpers.dp import (
    causal_dataset,
    names_by_id,
    norm_of,
    per_example_grads,
    perturbed_model,
    seeded_audit,
)

CPU = torch.device("cpu")
LABELS = ("a", "b", "c")


def unit_config(make_config, **extra):
    overrides = {
        "data": {"privacy_unit": "patient", "max_rows_per_unit": 8},
        "training": {"batch_size": 2, "local_steps": 3},
        "privacy": {"accountant": "rdp", "max_grad_norm": 0.5},
    }
    for section, values in extra.items():
        overrides[section] = {**overrides.get(section, {}), **values}
    return make_config(overrides)


def persons_of(sizes):
    return torch.as_tensor(np.repeat(np.arange(len(sizes)), sizes))


def ledger_with_noise(cfg, path, sigma=1.0):
    ledger = PrivacyLedger.from_config(cfg.privacy, path)
    ledger.noise_multiplier = sigma
    return ledger


def batch_of(data, persons, cap=8):
    return PersonRows(data, cap)([(torch.tensor(p),) for p in persons])


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_update_is_the_sum_of_clipped_person_means(
    make_config, vocab_size, toy_classification, tokenizer, task, tmp_path
):
    sizes = [3, 1, 4, 2, 5, 1]
    causal = {"model": {"source": "tiny-llama", "task": "causal-lm"}} if task == "causal-lm" else {}
    cfg = unit_config(make_config, **causal)
    if task == "classification":
        data = toy_classification(n=sum(sizes), num_labels=len(LABELS), seed=5)
        model = perturbed_model(cfg, vocab_size)
    else:
        data = causal_dataset(tokenizer, n=sum(sizes))
        model = perturbed_model(cfg, vocab_size, labels=(), scale=0.05)
    data = with_units(data, persons_of(sizes))
    reference = copy.deepcopy(model)
    sampled = [0, 2, 4, 5]
    batch = batch_of(data, sampled)

    rows = per_example_grads(reference, batch[:3], task)
    means = []
    for position in range(len(sampled)):
        mine = [g for g, o in zip(rows, batch[3].tolist(), strict=True) if o == position]
        means.append({k: sum(g[k] for g in mine) / len(mine) for k in mine[0]})
    norms = [norm_of(m) for m in means]
    clip = math.sqrt(min(norms) * max(norms))
    assert any(n > clip for n in norms) and any(n < clip for n in norms), norms
    expected = {
        k: sum(m[k] * min(1.0, clip / n) for m, n in zip(means, norms, strict=True)) for k in means[0]
    }

    cfg = unit_config(make_config, privacy={"max_grad_norm": clip}, **causal)
    trainer = LocalTrainer(cfg, model, data, CPU, ledger_with_noise(cfg, tmp_path / "ledger.json"))
    optimizer = trainer.optimizer
    optimizer.noise_multiplier = 0.0
    assert trainer._step(batch) is not None
    names = names_by_id(trainer)
    for p in optimizer.params:
        want = expected[names[id(p)]]
        torch.testing.assert_close(p.summed_grad, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(p.grad * optimizer.expected_batch_size, want, atol=1e-5, rtol=1e-5)
    # Noise and the mean's divisor are per person: the expected batch counts persons, not rows.
    assert trainer.sample_rate == poisson_rate(len(sizes), 2)
    assert optimizer.expected_batch_size == int(len(sizes) * trainer.sample_rate)


def test_fifty_rows_move_the_update_no_more_than_one(make_config, vocab_size, toy_classification, tmp_path):
    """Whatever their rows say, a person changes the summed gradient by at most the clipping norm."""
    # The worst case for row-level DP: fifty identical rows, whose gradients all point the same way.
    data = toy_classification(n=2, num_labels=len(LABELS), seed=6).subset([0] * 50 + [1])
    data = with_units(data, persons_of([50, 1]))
    clip = 1e-3  # far below any gradient here: both are clipped
    moved = {}
    for unit in ("patient", None):
        cfg = unit_config(
            make_config, data={"privacy_unit": unit, "max_rows_per_unit": 50}, privacy={"max_grad_norm": clip}
        )
        model = perturbed_model(cfg, vocab_size)
        trainer = LocalTrainer(cfg, model, data, CPU, ledger_with_noise(cfg, tmp_path / f"{unit}.json"))
        trainer.optimizer.noise_multiplier = 0.0
        for who, persons in (("fifty", [0]), ("one", [1])):
            batch = batch_of(data, persons, cap=50)
            trainer._step(batch if unit else batch[:3])
            moved[unit, who] = math.sqrt(
                sum(float(p.summed_grad.pow(2).sum()) for p in trainer.optimizer.params)
            )
    assert moved["patient", "fifty"] <= clip * (1 + 1e-4)
    assert moved["patient", "one"] <= clip * (1 + 1e-4)
    assert moved["patient", "fifty"] == pytest.approx(clip, rel=1e-3)
    # Row-level DP bounds each row, not the person: the same 50 rows move it 50 clipping norms.
    assert moved[None, "fifty"] == pytest.approx(50 * clip, rel=1e-3)


def test_persons_are_poisson_sampled_and_capped(toy_classification):
    sizes = [1] * 30 + [12] * 10
    data = with_units(toy_classification(n=sum(sizes), seed=7), persons_of(sizes))
    rows = PersonRows(data, cap=4)
    torch.manual_seed(0)
    drawn = []
    for person in range(40):
        ids, _, _, owner = rows([(torch.tensor(person),)])
        assert owner.tolist() == [0] * min(sizes[person], 4)
        mine = set(np.flatnonzero(data.units.numpy() == person).tolist())
        index = [int(torch.nonzero((data.input_ids == r).all(1))[0]) for r in ids]
        assert set(index) <= mine and len(set(index)) == len(index)
        drawn.append(frozenset(index))
    # A person with more rows than the cap gets a fresh random subset each time.
    subsets = {frozenset(rows([(torch.tensor(35),)])[0][:, 0].tolist()) for _ in range(20)}
    assert len(subsets) > 1
    counts = unit_counts(data.units, 4)
    assert (counts.persons, counts.rows, counts.min_rows, counts.max_rows) == (40, 150, 1, 12)
    assert counts.median_rows == 1 and counts.rows_per_person == (30 + 40) / 40


def test_trainer_samples_persons_at_the_person_rate(make_config, vocab_size, toy_classification, tmp_path):
    sizes = [1] * 30 + [12] * 10
    data = with_units(toy_classification(n=sum(sizes), seed=8), persons_of(sizes))
    cfg = unit_config(make_config, training={"batch_size": 8})
    trainer = LocalTrainer(
        cfg, perturbed_model(cfg, vocab_size), data, CPU, ledger_with_noise(cfg, tmp_path / "l")
    )
    assert trainer.sample_rate == pytest.approx(1 / 5)
    per_step = []
    for _ in range(200):
        batch = next(trainer._batches)
        per_step.append(int(batch[3].max()) + 1 if len(batch[0]) else 0)
    assert np.mean(per_step) == pytest.approx(8, rel=0.15)  # 40 persons x 1/5


def test_ledger_epsilon_is_per_person_and_survives_a_restart(
    make_config, vocab_size, toy_classification, tmp_path
):
    sizes = [2, 7, 1, 3, 1, 9, 4, 1, 1, 5, 2, 6]
    data = with_units(toy_classification(n=sum(sizes), seed=9), persons_of(sizes))
    cfg = unit_config(make_config, privacy={"planned_rounds": 4, "epsilon": 4.0})
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.from_config(cfg.privacy, path)
    trainer = LocalTrainer(cfg, perturbed_model(cfg, vocab_size), data, CPU, ledger)
    for r in (1, 2):
        trainer.train_round(r)
    trainer.close()
    q = poisson_rate(len(sizes), 2)
    assert {e.sample_rate for e in ledger.entries} == {q}
    # An independent accountant, from the history on disk alone.
    saved = PrivacyLedger.from_config(cfg.privacy, path)
    accountant = create_accountant("rdp")
    accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in saved.entries]
    assert accountant.get_epsilon(delta=cfg.privacy.delta) == pytest.approx(saved.spent, rel=1e-6)
    # A restart: a new trainer on the same ledger keeps its noise and rate, and composes on top.
    again = LocalTrainer(cfg, perturbed_model(cfg, vocab_size), data, CPU, saved)
    assert again.noise_multiplier == ledger.noise_multiplier and again.sample_rate == q
    again.train_round(3)
    again.close()
    accountant.history.append((saved.noise_multiplier, q, 3))
    assert accountant.get_epsilon(delta=cfg.privacy.delta) == pytest.approx(saved.spent, rel=1e-6)
    assert saved.spent <= 4.0


def test_delta_must_be_below_one_over_persons(make_config, vocab_size, toy_classification, tmp_path):
    data = with_units(toy_classification(n=40, seed=1), persons_of([4] * 10))
    cfg = unit_config(make_config, privacy={"delta": 0.15})
    with pytest.raises(ConfigError, match=r"privacy.delta: 0.15 is not below 1/persons = 1/10") as err:
        LocalTrainer(cfg, perturbed_model(cfg, vocab_size), data, CPU, ledger_with_noise(cfg, tmp_path / "l"))
    assert "\n" not in str(err.value)


def write_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def table_rows(n=12):
    return [
        {"text": f"review {i} of item {i % 5}", "label": "ab"[i % 2], "patient": f"p{i // 3}", "site": "s0"}
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda r: [{k: v for k, v in x.items() if k != "patient"} for x in r],
            r"missing column 'patient' \(data.privacy_unit",
        ),
        (
            lambda r: [{**x, "patient": "  " if i == 4 else x["patient"]} for i, x in enumerate(r)],
            r"empty value in column 'patient' \(data.privacy_unit\) at row 5",
        ),
        (
            lambda r: [{**x, "patient": None if i == 2 else x["patient"]} for i, x in enumerate(r)],
            r"empty value in column 'patient' \(data.privacy_unit\) at row 3",
        ),
    ],
)
def test_bad_unit_column_is_one_line(make_config, tokenizer, tmp_path, change, message):
    path = write_csv(tmp_path / "t.csv", change(table_rows()))
    cfg = unit_config(make_config, data={"path": path})
    with pytest.raises(DataError, match=message) as err:
        build_data(cfg, tokenizer)
    assert "\n" not in str(err.value) and path in str(err.value)


def test_a_row_split_of_persons_is_refused(make_config, tokenizer, tmp_path):
    cfg = unit_config(make_config, data={"path": write_csv(tmp_path / "t.csv", table_rows())})
    bundle = build_data(cfg, tokenizer)
    for how in ("iid", "dirichlet"):
        sim = dataclasses.replace(cfg.simulation, partition=how, num_clients=2)
        with pytest.raises(ConfigError, match=rf"simulation.partition: '{how}' splits rows") as err:
            partition(bundle, sim)
        assert "\n" not in str(err.value)


def test_a_person_in_two_institutions_is_refused(make_config, tokenizer, tmp_path):
    rows = table_rows()
    for i, row in enumerate(rows):
        row["site"] = "north" if i < 7 else "south"  # patient p2 (rows 7-9) straddles the two
    cfg = unit_config(
        make_config,
        data={"path": write_csv(tmp_path / "t.csv", rows)},
        simulation={"partition": "column", "partition_column": "site", "num_clients": 2},
    )
    bundle = build_data(cfg, tokenizer)
    with pytest.raises(DataError, match=r"rows 7 and 8 are the same person at two institutions") as err:
        partition(bundle, cfg.simulation)
    assert "\n" not in str(err.value) and "p2" not in str(err.value)
    for i, row in enumerate(rows):
        row["site"] = "north" if i < 6 else "south"
    cfg = unit_config(
        make_config,
        data={"path": write_csv(tmp_path / "t.csv", rows)},
        simulation={"partition": "column", "partition_column": "site", "num_clients": 2},
    )
    parts = partition(build_data(cfg, tokenizer), cfg.simulation)
    assert [len(p) for p in parts] == [6, 6]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"privacy": {"grad_sample_mode": "ghost"}},
            r"privacy.grad_sample_mode: 'ghost' never forms per-row",
        ),
        ({"data": {"privacy_unit": " "}}, r"data.privacy_unit: expected a column name"),
        ({"data": {"max_rows_per_unit": 0}}, r"data.max_rows_per_unit: must be >= 1"),
        (
            {"training": {"physical_batch_size": 4}},
            r"training.physical_batch_size: slices would split a person's rows",
        ),
    ],
)
def test_unsupported_combinations_are_one_line(overrides, message):
    data = {"data": {"privacy_unit": "patient"}, **{k: v for k, v in overrides.items() if k != "data"}}
    data["data"] = {**data["data"], **overrides.get("data", {})}
    with pytest.raises(ConfigError, match=message) as err:
        config_from_dict(data, source="t.yaml")
    assert "\n" not in str(err.value)


def test_input_canaries_are_persons_of_their_own(toy_classification):
    data = with_units(toy_classification(n=6, seed=2), persons_of([4, 2]))
    spec = CanarySpec(
        seed=3, white_box=2, black_box=8, space=(), task="classification", vocab_size=5000, num_labels=2
    )
    joined = with_input_canaries(data, spec)
    added = int(spec.black_box_included.sum())
    assert joined.units.tolist() == [0, 0, 0, 0, 1, 1, *range(2, 2 + added)]


def site(tmp_path, unit):
    rows = [
        {"text": f"review {i} of item {i % 5}", "label": "ab"[i % 2], "patient": f"p{i % 30}"}
        for i in range(90)
    ]
    rows += [{"text": f"extra {i}", "label": "a", "patient": "heavy"} for i in range(10)]
    path = write_csv(tmp_path / "site.csv", rows)
    config = tmp_path / "site.yaml"
    data = f"  privacy_unit: {unit}\n  max_rows_per_unit: 4\n" if unit else ""
    config.write_text(
        f"model:\n  source: tiny-bert\ndata:\n  path: {path}\n{data}"
        "training:\n  batch_size: 8\n  local_steps: 2\n  device: cpu\n"
        f"privacy:\n  accountant: rdp\n  ledger_path: {tmp_path / 'ledger.json'}\nfederation:\n  rounds: 3\n"
    )
    return str(config)


def row_value(output: str, name: str) -> str:
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│") if c.strip()]
        if len(cells) == 2 and cells[0] == name:
            return cells[1]
    raise AssertionError(f"no row {name!r} in:\n{output}")


@pytest.fixture
def wide_report(monkeypatch):
    """The check's table on one line per row (captured output is 80 columns wide otherwise)."""
    from rich.console import Console

    monkeypatch.setattr("fedlora.client.cli.report", Console(width=400))


def test_check_prints_persons_and_epsilon_per_person(tmp_path, capsys, wide_report):
    assert client_main(["check", site(tmp_path, "patient")]) == 0
    out = capsys.readouterr().out
    assert row_value(out, "privacy unit").startswith("person (column 'patient')")
    assert row_value(out, "persons") == "31"
    assert row_value(out, "rows per person").startswith("min 3, median 3, max 10 (100 rows)")
    assert row_value(out, "rows per person cap").startswith("4 (data.max_rows_per_unit)")
    rate = row_value(out, "sample rate")
    assert rate.startswith(f"{1 / math.ceil(31 / 8):.4g}:") and "over persons" in rate
    after = row_value(out, "epsilon per person after round")
    assert [int(x.split(":")[0]) for x in after.split(",")] == [1, 2, 3]
    assert float(after.split(",")[-1].split(":")[1]) <= 8.0
    # Round 0's statistics are planned per person, before the rounds: a quarter of the budget.
    released = row_value(out, "statistics noise")
    assert "25% of epsilon alone" in released and "of 31 persons, each person's rows averaged" in released
    assert float(released.split(":")[0]) == pytest.approx(calibrate_noise(2.0, 1e-5, "rdp", 1.0, 1), rel=1e-3)


def test_check_says_privacy_unit_row_plainly(tmp_path, capsys, wide_report):
    assert client_main(["check", site(tmp_path, None)]) == 0
    out = capsys.readouterr().out
    assert row_value(out, "privacy unit").startswith("row:")
    assert "epsilon per row after round" in out and "persons" not in out.split("recipe")[0]


def test_synthetic_patients_are_deterministic_and_skewed():
    conditions = np.array(["x"] * 300 + ["y"] * 200 + ["z"] * 100)
    ids = patient_ids(conditions, seed=0)
    assert np.array_equal(ids, patient_ids(conditions, seed=0))
    assert not np.array_equal(ids, patient_ids(conditions, seed=1))
    sizes = np.bincount(np.unique(ids, return_inverse=True)[1])
    assert sizes.min() >= 1 and sizes.max() == LARGEST and sizes.sum() == 600
    assert np.median(sizes) < np.mean(sizes) < LARGEST / 2  # skewed: many small, a few large
    for patient in np.unique(ids):
        assert len(set(conditions[ids == patient])) == 1  # a patient reviews for one condition


def test_train_local_card_states_the_person_unit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [
        {"text": f"note {i} on {'cough' if i % 2 else 'rash'}", "label": "rd"[i % 2], "patient": i % 7}
        for i in range(28)
    ]
    write_csv(tmp_path / "train.csv", rows)
    (tmp_path / "site.yaml").write_text(
        "name: hospital-a\nmodel:\n  source: tiny-bert\ndata:\n  path: train.csv\n  max_length: 16\n"
        "  privacy_unit: patient\n  max_rows_per_unit: 2\ntraining:\n  batch_size: 2\n  local_steps: 2\n"
        "  device: cpu\nprivacy:\n  epsilon: 8\n  accountant: rdp\n  planned_rounds: 1\n"
        "  ledger_path: ledger.json\n"
    )
    assert client_main(["train-local", "site.yaml", "--out", "out"]) == 0
    card = (tmp_path / "out" / "adapter" / "README.md").read_text()
    assert "privacy unit: one person (data.privacy_unit, column `patient`)" in card
    assert "mean over up to 2 of their rows" in card and "per-person gradient clipping norm" in card
    assert "privacy unit: one row" not in card
    saved = PrivacyLedger(tmp_path / "ledger.json", 8.0, 1e-5, "rdp")
    assert [e.sample_rate for e in saved.entries] == [poisson_rate(7, 2)]


def test_audit_with_persons_claims_per_person_and_its_canaries_are_persons(
    make_config, tmp_path, monkeypatch
):
    rows = [
        {"text": f"note {i} about {'cough' if i % 2 else 'rash'}", "label": "rd"[i % 2], "patient": i % 12}
        for i in range(48)
    ]
    cfg = make_config(
        {
            "model": {"source": "tiny-bert", "lora_r": 64},
            "data": {
                "path": write_csv(tmp_path / "t.csv", rows),
                "max_length": 16,
                "privacy_unit": "patient",
            },
            "training": {"batch_size": 4, "local_steps": 5, "learning_rate": 0.01},
            "privacy": {"accountant": "rdp", "epsilon": 4.0, "ledger_path": str(tmp_path / "real.json")},
            "federation": {"rounds": 2},
        }
    )
    black = 10
    seeded_audit(monkeypatch)  # its noise check and bound below: one verdict in every run
    result = run_local_audit(cfg, tmp_path / "audit", 1000, black)
    ledger = PrivacyLedger(tmp_path / "audit" / AUDIT_LEDGER, 4.0, cfg.privacy.delta, "rdp")
    spec = CanarySpec.load(tmp_path / "audit" / CANARY_FILE)
    persons = 12 + int(spec.black_box_included.sum())  # each included input canary is one more person
    assert {e.sample_rate for e in ledger.entries} == {poisson_rate(persons, 4)}
    assert result.claimed_epsilon == pytest.approx(ledger.spent) and ledger.spent <= 4.0
    assert not result.leaks and result.white_box.epsilon <= result.claimed_epsilon
    # The noise check recomputes the clipped sum over persons (per-person mean gradients) as Opacus does.
    assert result.noise.passed and result.noise.ratio == pytest.approx(1.0, abs=0.05)


def test_recipe_plans_batches_of_persons(make_config):
    privacy_unit, rdp = {"privacy_unit": "patient"}, {"accountant": "rdp"}  # rdp: a faster calibration
    cfg = make_config({"data": privacy_unit, "training": {"examples_per_round": 192}, "privacy": rdp})
    recipe = plan(facts(cfg, 300, 3, persons=60, rows_per_person=3.0), cfg)
    # 192 rows of compute / 3 rows per person / 3 steps: 21 persons a step; 192 / (21 x 3) = 3 steps.
    assert (recipe.batch_size.value, recipe.local_steps.value) == (21, 3)
    assert recipe.sample_rate.value == 1 / math.ceil(60 / 21)
    assert "over persons" in recipe.sample_rate.reason and "persons 60" in recipe.batch_size.reason
    # Round 0 is planned per person too: the same Gaussian release, its quarter of the budget.
    privacy = cfg.privacy
    quarter = calibrate_noise(0.25 * privacy.epsilon, privacy.delta, privacy.accountant, 1.0, 1)
    assert recipe.statistics_noise.value == quarter
    assert "of 60 persons, each person's rows averaged" in recipe.statistics_noise.reason
    assert recipe.fine_tune.value
    # Too few persons for DP-SGD to add anything over 75,000 trained values: the whole budget on round 0.
    few = plan(facts(cfg, 300, 3, persons=60, rows_per_person=3.0, trainable=75_000), cfg)
    assert not few.fine_tune.value and few.local_steps.value == 0
    assert "nothing measurable on these persons" in few.fine_tune.reason
    whole = calibrate_noise(privacy.epsilon, privacy.delta, privacy.accountant, 1.0, 1)
    assert few.statistics_noise.value == whole and "the whole epsilon" in few.statistics_noise.reason


def test_empty_person_batches_step_and_count(make_config, vocab_size, toy_classification, tmp_path):
    """One expected person a step out of 40: many steps draw nobody (the first one too, sometimes)."""
    data = with_units(toy_classification(n=80, seed=11), persons_of([2] * 40))
    cfg = unit_config(
        make_config, training={"batch_size": 1, "local_steps": 30}, privacy={"planned_rounds": 1}
    )
    ledger = ledger_with_noise(cfg, tmp_path / "ledger.json", sigma=5.0)
    trainer = LocalTrainer(cfg, perturbed_model(cfg, vocab_size), data, CPU, ledger)
    before = {k: p.detach().clone() for k, p in trainer._trained.items()}
    result = trainer.train_round(1)
    assert result.steps == 30 and ledger.entries[-1].steps == 30
    assert ledger.entries[-1].sample_rate == 1 / 40
    assert any(not torch.equal(before[k], p) for k, p in trainer._trained.items())


def test_a_federation_of_two_institutions_spends_per_person(tmp_path, monkeypatch, opacus_epsilon):
    """The real ServerApp and ClientApp (test_resume's in-process grid): each institution answers round
    0's statistics per person, then samples its own persons; its ledger, kept in the person unit,
    records the release at round 0 and its own person sample rate after it, as Opacus composes them."""
    from flwr.supercore.task_identity import TaskIdentity

    from helpers.grid import run

    for attribute in ("_run_id", "_node_id", "_task_id"):  # Message() as inside a ServerApp process
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    rows = [
        {"text": f"note {i} on {'cough' if i % 2 else 'rash'}", "label": "rd"[i % 2], "patient": f"p{i % 15}"}
        for i in range(60)
    ]
    for row in rows:
        row["site"] = "north" if int(row["patient"][1:]) < 9 else "south"  # 9 and 6 patients
    path = write_csv(tmp_path / "t.csv", rows)
    cfg = config_from_dict(
        {
            "model": {"source": "tiny-bert"},
            "data": {"path": path, "max_length": 16, "privacy_unit": "patient"},
            "training": {"batch_size": 2, "local_steps": 2, "device": "cpu"},
            "privacy": {"accountant": "rdp"},
            "federation": {
                "rounds": 2,
                "min_clients": 2,
                "fraction_evaluate": 0,
                "central_eval": False,
            },
            "simulation": {"num_clients": 2, "partition": "column", "partition_column": "site"},
        }
    )
    run(cfg, tmp_path / "run")
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[0]["round"] == 0 and len(history[0]["clients"]) == 2  # both took part in round 0
    for pid, persons in ((0, 9), (1, 6)):
        path = tmp_path / "run" / "ledgers" / f"client-{pid}.json"
        assert json.loads(path.read_text())["privacy_unit"] == "patient"
        ledger = PrivacyLedger(path, 8.0, 1e-5, "rdp")
        release, *rounds = ledger.entries
        assert (release.round, release.sample_rate, release.steps) == (STATISTICS_ROUND, 1.0, 1)
        assert [e.sample_rate for e in rounds] == [poisson_rate(persons, 2)] * 2
        steps = [(release.noise_multiplier, 1.0, 1)]
        assert release.epsilon == pytest.approx(opacus_epsilon("rdp", steps), rel=1e-6)
        steps += [(e.noise_multiplier, e.sample_rate, e.steps) for e in rounds]
        assert ledger.spent == pytest.approx(opacus_epsilon("rdp", steps), rel=1e-6)
        assert 0 < ledger.spent <= 8.0
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert "its person counts (one Gaussian mechanism, L2 sensitivity sqrt(2) per person" in card
    assert "Each person's rows (column `patient`) were averaged first: a person counts once" in card


def test_a_ledger_kept_per_row_cannot_go_on_per_person(make_config, vocab_size, toy_classification, tmp_path):
    data = with_units(toy_classification(n=24, seed=12), persons_of([2] * 12))
    path = tmp_path / "ledger.json"
    row = unit_config(make_config, data={"privacy_unit": None}, privacy={"planned_rounds": 2})
    trainer = LocalTrainer(row, perturbed_model(row, vocab_size), data, CPU, ledger_with_noise(row, path))
    trainer.train_round(1)
    trainer.close()
    assert json.loads(path.read_text())["privacy_unit"] == "row"
    person = unit_config(make_config, privacy={"planned_rounds": 2})
    with pytest.raises(CheckpointError, match=r"kept with privacy unit row, the config's is person") as err:
        LocalTrainer(
            person,
            perturbed_model(person, vocab_size),
            data,
            CPU,
            PrivacyLedger.from_config(person.privacy, path),
        )
    assert "\n" not in str(err.value)
    fresh = tmp_path / "person.json"
    trainer = LocalTrainer(
        person, perturbed_model(person, vocab_size), data, CPU, ledger_with_noise(person, fresh)
    )
    trainer.train_round(1)
    trainer.close()
    assert json.loads(fresh.read_text())["privacy_unit"] == "patient"
