"""The privacy ledger: composed spend checked against Opacus directly, durability, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict

import pytest
import torch
from opacus.accountants import create_accountant

from fedlora.client.ledger import LedgerEntry, PrivacyLedger, merged_history
from fedlora.client.trainer import LocalTrainer
from fedlora.common.accounting import compose, composed
from fedlora.common.adapter import adapter_state, peft_module
from fedlora.common.errors import BudgetExceeded, CheckpointError, ConfigError
from fedlora.common.model import build_model

CPU = torch.device("cpu")
DELTA = 1e-5


def opacus_epsilon(mechanism: str, history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def summed_per_mechanism(entries: list[dict]) -> list[tuple[float, float, int]]:
    """The file's entries, un-merged, with steps summed per (noise, sample rate): composition of
    identical mechanisms does not depend on their order."""
    steps: dict[tuple[float, float], int] = defaultdict(int)
    for e in entries:
        steps[(e["noise_multiplier"], e["sample_rate"])] += e["steps"]
    return [(noise, rate, n) for (noise, rate), n in steps.items()]


def internal_accountant(optimizer):
    """The accountant Opacus' make_private hooked onto the optimizer: what Opacus itself counted."""
    cells = [c.cell_contents for c in optimizer.step_hook.__closure__ or ()]
    found = [c for c in cells if hasattr(c, "history") and hasattr(c, "get_epsilon")]
    assert len(found) == 1, cells
    return found[0]


def ledger_with(tmp_path, rounds, sigma=1.1, rate=0.25, steps=3, budget=8.0):
    """A ledger on disk with ``rounds`` reserved rounds."""
    ledger = PrivacyLedger(tmp_path / "l.json", budget, DELTA, "rdp")
    ledger.noise_multiplier = sigma
    for r in range(1, rounds + 1):
        ledger.reserve(r, rate, steps)
    return ledger


@pytest.mark.slow
def test_k_rounds_spend_matches_opacus_and_is_committed_each_round(
    make_config, vocab_size, toy_classification, tmp_path
):
    cfg = make_config(
        {
            "training": {"batch_size": 4, "local_steps": 3},
            "privacy": {"epsilon": 8.0, "planned_rounds": 3, "accountant": "prv"},
        }
    )
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, cfg.privacy.epsilon, cfg.privacy.delta, cfg.privacy.accountant)
    sigma = ledger.noise_multiplier = 1.2  # calibration has its own test
    model = build_model(cfg.model, ("a", "b"), vocab_size).model
    trainer = LocalTrainer(cfg, model, toy_classification(n=16), CPU, ledger)
    assert trainer.noise_multiplier == sigma == trainer.optimizer.noise_multiplier
    assert not path.exists()  # nothing spent yet, nothing written

    seen_during_last_step = []

    def on_step(step, _loss):
        if step == cfg.training.local_steps:
            entries = json.loads(path.read_text())["entries"] if path.exists() else []
            seen_during_last_step.append(len(entries))

    for r in range(1, 4):
        result = trainer.train_round(r, on_step=on_step)
        # Reserved before train_round returned: the file already holds this round.
        on_disk = json.loads(path.read_text())
        assert [e["round"] for e in on_disk["entries"]] == list(range(1, r + 1))
        assert on_disk["entries"][-1]["epsilon"] == pytest.approx(result.epsilon)
        # No temp file left; the lock's sidecar stays (removing it would race another process).
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]
    assert seen_during_last_step == [1, 2, 3]  # ... and already while the round's steps ran

    on_disk = json.loads(path.read_text())
    assert on_disk["accountant"] == "prv" and on_disk["delta"] == DELTA
    assert on_disk["noise_multiplier"] == sigma
    history = summed_per_mechanism(on_disk["entries"])
    assert history == [(sigma, 0.25, 9)]
    independent = opacus_epsilon("prv", history)
    assert ledger.spent == pytest.approx(independent, rel=1e-6)
    # Entry k holds the spend after k rounds, composed independently too.
    for k in (1, 2):
        assert on_disk["entries"][k - 1]["epsilon"] == pytest.approx(
            opacus_epsilon("prv", [(sigma, 0.25, 3 * k)]), rel=1e-6
        )
    assert 0 < independent < cfg.privacy.epsilon
    # What Opacus itself counted while training is what the ledger charged.
    counted = internal_accountant(trainer.optimizer).history
    assert merged_history(ledger.entries) == [tuple(h) for h in counted]
    # Merged and un-merged histories compose to the same epsilon.
    unmerged = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in on_disk["entries"]]
    assert len(unmerged) == 3
    assert opacus_epsilon("prv", unmerged) == pytest.approx(independent, rel=1e-6)


def test_calibrated_noise_spends_the_budget_over_the_planned_steps(tmp_path):
    budget, rate, steps = 3.0, 0.25, 12
    ledger = PrivacyLedger(tmp_path / "l.json", budget, DELTA, "rdp")
    sigma = ledger.calibrate(rate, steps)
    assert 0.95 * budget <= opacus_epsilon("rdp", [(sigma, rate, steps)]) <= budget
    assert opacus_epsilon("rdp", [(0.95 * sigma, rate, steps)]) > budget  # no needless noise
    assert not ledger.path.exists()  # calibrating spends nothing


class SpyLedger(PrivacyLedger):
    def calibrate(self, sample_rate, planned_steps, also=()):
        self.asked = (sample_rate, planned_steps, also)
        self.noise_multiplier = 1.0
        return 1.0


def test_trainer_calibrates_for_the_planned_rounds(make_config, vocab_size, toy_classification, tmp_path):
    cfg = make_config(
        {
            "training": {"batch_size": 4, "local_steps": 7},
            "federation": {"rounds": 5},
            "privacy": {"planned_rounds": 3, "accountant": "rdp"},
        }
    )
    ledger = SpyLedger(tmp_path / "l.json", 8.0, DELTA, "rdp")
    trainer = LocalTrainer(
        cfg, build_model(cfg.model, ("a", "b"), vocab_size).model, toy_classification(n=16), CPU, ledger
    )
    # privacy.planned_rounds wins over federation.rounds; the round-0 statistics release composes first
    release = trainer.recipe.statistics_history()
    assert ledger.asked == (4 / 16, 3 * 7, release)
    assert len(release) == 1 and release[0][1:] == (1.0, 1)


def test_merged_history_merges_only_consecutive_equal_mechanisms():
    def entry(r, noise, rate, steps):
        return LedgerEntry(r, noise, rate, steps, 0.0, 0.0)

    entries = [
        entry(1, 1.0, 0.1, 3),
        entry(2, 1.0, 0.1, 4),
        entry(3, 2.0, 0.1, 5),
        entry(4, 1.0, 0.2, 6),
        entry(5, 1.0, 0.1, 7),
        entry(6, 1.0, 0.1, 1),
    ]
    merged = merged_history(entries)
    assert merged == [(1.0, 0.1, 7), (2.0, 0.1, 5), (1.0, 0.2, 6), (1.0, 0.1, 8)]
    assert sum(h[2] for h in merged) == sum(e.steps for e in entries)
    assert merged_history([]) == []


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_merged_and_unmerged_histories_compose_alike(mechanism):
    unmerged = [(1.1, 0.25, 3), (1.1, 0.25, 2), (1.6, 0.1, 4), (1.1, 0.25, 2)]
    entries = [LedgerEntry(i, n, q, s, 0.0, 0.0) for i, (n, q, s) in enumerate(unmerged)]
    merged = merged_history(entries)
    assert len(merged) == 3
    epsilon = compose(mechanism, merged, DELTA)
    assert epsilon == pytest.approx(opacus_epsilon(mechanism, unmerged), rel=1e-6)
    assert compose(mechanism, [], DELTA) == 0.0


@pytest.mark.slow
def test_a_new_process_reads_the_same_spend(tmp_path):
    ledger = ledger_with(tmp_path, rounds=3)
    code = (
        "import json, sys\n"
        "from fedlora.client.ledger import PrivacyLedger\n"
        "ledger = PrivacyLedger(sys.argv[1], 8.0, 1e-05, 'rdp')\n"
        "print(json.dumps({'spent': ledger.spent, 'noise': ledger.noise_multiplier,\n"
        "  'history': ledger.history(), 'rounds': [e.round for e in ledger.entries],\n"
        "  'recomputed': ledger.projected(ledger.noise_multiplier, 0.25, 0)}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(ledger.path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["spent"] == ledger.spent  # exact: the same float, read back
    assert seen["spent"] > 0
    assert seen["noise"] == ledger.noise_multiplier
    assert [tuple(h) for h in seen["history"]] == ledger.history() == [(1.1, 0.25, 9)]
    assert seen["rounds"] == [1, 2, 3]
    assert seen["recomputed"] == pytest.approx(ledger.spent, rel=1e-9)


def test_round_over_budget_is_refused_and_nothing_trained(
    make_config, vocab_size, toy_classification, tmp_path
):
    sigma, rate, steps = 1.1, 0.25, 3
    one, two = (
        opacus_epsilon("rdp", [(sigma, rate, steps)]),
        opacus_epsilon("rdp", [(sigma, rate, 2 * steps)]),
    )
    budget = round((one + two) / 2, 3)  # room for one round, not two
    assert one < budget < two
    cfg = make_config(
        {
            "training": {"batch_size": 4, "local_steps": steps},
            "privacy": {"epsilon": budget, "accountant": "rdp"},
        }
    )
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, budget, DELTA, "rdp")
    ledger.noise_multiplier = sigma
    model = build_model(cfg.model, ("a", "b"), vocab_size).model
    trainer = LocalTrainer(cfg, model, toy_classification(n=16), CPU, ledger)
    trainer.train_round(1)
    assert ledger.spent == pytest.approx(one, rel=1e-9)

    before_bytes = path.read_bytes()
    before_adapter = adapter_state(trainer.model)
    before_params = {n: p.detach().clone() for n, p in peft_module(trainer.model).named_parameters()}
    before_steps = [float(s["step"]) for s in trainer.optimizer.original_optimizer.state.values()]
    assert before_steps and all(n == steps for n in before_steps)
    calls = []
    for _ in range(2):  # refused every time, not only once
        with pytest.raises(BudgetExceeded) as info:
            trainer.train_round(2, on_step=lambda *a: calls.append(a))
        message = str(info.value)
        assert "\n" not in message
        assert f"{one:.3f}" in message  # what was spent
        assert f"{budget:g}" in message  # of what budget
        assert f"{two:.3f}" in message  # where this round would take it
        assert "affords: 0" in message  # what is left: no round
    assert calls == []
    assert path.read_bytes() == before_bytes
    after = adapter_state(trainer.model)
    assert after.keys() == before_adapter.keys()
    assert all(torch.equal(after[k], before_adapter[k]) for k in after)
    assert all(torch.equal(p, before_params[n]) for n, p in peft_module(trainer.model).named_parameters())
    assert [float(s["step"]) for s in trainer.optimizer.original_optimizer.state.values()] == before_steps
    assert [e.round for e in ledger.entries] == [1]


def test_reserve_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    ledger = ledger_with(tmp_path, rounds=1)
    before = ledger.path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fedlora.common.durable.os.replace", broken_replace)
    with pytest.raises(OSError):
        ledger.reserve(2, 0.25, 3)
    assert ledger.path.read_bytes() == before
    assert [e.round for e in ledger.entries] == [1]  # memory agrees with the file
    names = [ledger.path.name, ledger.lock_path.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    monkeypatch.undo()
    ledger.reserve(3, 0.25, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert [e["round"] for e in json.loads(ledger.path.read_text())["entries"]] == [1, 3]


CORRUPT = {
    "not-json": "{not json",
    "truncated": None,  # the first half of a valid file
    "a-list": "[1, 2, 3]",
    "no-entries": json.dumps({"accountant": "rdp", "delta": DELTA, "noise_multiplier": 1.0}),
    "bad-entry": json.dumps(
        {"accountant": "rdp", "delta": DELTA, "noise_multiplier": 1.0, "entries": [{"round": 1}]}
    ),
    "empty": "",
    "steps-not-a-number": json.dumps(
        {
            "accountant": "rdp",
            "delta": DELTA,
            "noise_multiplier": 1.0,
            "entries": [
                {
                    "round": 1,
                    "noise_multiplier": 1.0,
                    "sample_rate": 0.25,
                    "steps": "x",
                    "epsilon": 1.0,
                    "time": 0,
                }
            ],
        }
    ),
    "noise-not-a-number": json.dumps(
        {"accountant": "rdp", "delta": DELTA, "noise_multiplier": "a", "entries": []}
    ),
    "entries-not-a-list": json.dumps(
        {"accountant": "rdp", "delta": DELTA, "noise_multiplier": 1.0, "entries": {}}
    ),
    "entry-noise-negative": json.dumps(
        {
            "accountant": "rdp",
            "delta": DELTA,
            "noise_multiplier": 1.0,
            "entries": [
                {
                    "round": 1,
                    "noise_multiplier": -1.0,
                    "sample_rate": 0.25,
                    "steps": 3,
                    "epsilon": 1.0,
                    "time": 0,
                }
            ],
        }
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_ledger_is_refused_naming_the_file(tmp_path, case):
    path = ledger_with(tmp_path, rounds=1).path
    text = CORRUPT[case]
    path.write_text(path.read_text()[: len(path.read_text()) // 2] if text is None else text)
    with pytest.raises(CheckpointError) as info:
        PrivacyLedger(path, 8.0, DELTA, "rdp")
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("delta", "accountant", "culprit"), [(DELTA, "prv", "'rdp'"), (1e-6, "rdp", "1e-06")]
)
def test_ledger_kept_with_other_delta_or_accountant_is_refused(tmp_path, delta, accountant, culprit):
    path = ledger_with(tmp_path, rounds=1).path
    with pytest.raises(CheckpointError) as info:
        PrivacyLedger(path, 8.0, delta, accountant)
    assert str(path) in str(info.value)
    assert culprit in str(info.value)


@pytest.mark.slow
def test_rounds_affordable_agrees_with_a_brute_force_loop(tmp_path):
    sigma, rate, steps = 1.2, 0.1, 4
    ledger = ledger_with(tmp_path, rounds=2, sigma=sigma, rate=rate, steps=steps, budget=3.75)
    spent = ledger.spent
    assert 0 < spent < ledger.budget

    brute = 0
    while ledger.projected(sigma, rate, steps * (brute + 1)) <= ledger.budget:
        brute += 1
        assert brute < 50, "budget too loose for a brute-force loop"
    assert brute >= 3, "want a count the search can get wrong"
    assert ledger.rounds_affordable(rate, steps) == brute
    # A limit caps the answer.
    assert ledger.rounds_affordable(rate, steps, limit=2) == 2
    # Another round shape gives its own count: one round of the whole remaining plan fits or not.
    assert ledger.rounds_affordable(rate, steps * (brute + 1)) == 0
    assert ledger.rounds_affordable(rate, steps * brute) == 1
    # The spend was not touched by the probes.
    assert ledger.spent == spent
    assert len(ledger.entries) == 2


def test_uncalibrated_ledger_refuses_to_reserve(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json", 8.0, DELTA, "rdp")
    assert ledger.spent == 0.0 and ledger.rounds_affordable(0.1, 5) == 0
    with pytest.raises(BudgetExceeded):
        ledger.reserve(1, 0.1, 5)
    assert not ledger.path.exists()


def test_noise_is_kept_for_the_life_of_the_ledger(tmp_path):
    ledger = ledger_with(tmp_path, rounds=1, sigma=1.7)
    reread = PrivacyLedger(ledger.path, 8.0, DELTA, "rdp")
    # Calibrating again (another plan) does not change the noise the spend was computed with.
    assert reread.calibrate(0.5, 1000) == 1.7
    assert reread.noise_multiplier == 1.7


def test_ledger_charges_the_rate_opacus_samples_at(make_config, vocab_size, toy_classification, tmp_path):
    cfg = make_config({"training": {"batch_size": 4, "local_steps": 2}, "privacy": {"accountant": "rdp"}})
    ledger = PrivacyLedger(tmp_path / "l.json", 8.0, DELTA, "rdp")
    ledger.noise_multiplier = 1.1
    data = toy_classification(n=10)  # not a multiple of the batch size
    trainer = LocalTrainer(cfg, build_model(cfg.model, ("a", "b"), vocab_size).model, data, CPU, ledger)
    trainer.train_round(1)
    charged = ledger.entries[-1].sample_rate
    counted = internal_accountant(trainer.optimizer).history
    assert counted[-1][1] == trainer.loader.sample_rate  # what Opacus samples at and counts
    assert charged == pytest.approx(trainer.loader.sample_rate)


def test_trainer_uses_the_noise_another_process_recorded_first(
    make_config, vocab_size, toy_classification, tmp_path
):
    """Two processes calibrated for different plans: the first to reserve fixes the ledger's noise,
    and the other trains and is charged with that noise, not its own."""
    cfg = make_config({"training": {"batch_size": 4, "local_steps": 2}, "privacy": {"accountant": "rdp"}})
    path = tmp_path / "ledger.json"
    mine = PrivacyLedger(path, 8.0, DELTA, "rdp")
    mine.noise_multiplier = 1.0
    trainer = LocalTrainer(
        cfg, build_model(cfg.model, ("a", "b"), vocab_size).model, toy_classification(16), CPU, mine
    )
    theirs = PrivacyLedger(path, 8.0, DELTA, "rdp")
    theirs.noise_multiplier = 1.5
    theirs.reserve(1, 0.25, 2)
    result = trainer.train_round(1)
    assert result.noise_multiplier == trainer.optimizer.noise_multiplier == 1.5
    assert internal_accountant(trainer.optimizer).history == [(1.5, 0.25, 2)]  # what Opacus counted
    assert mine.history() == [(1.5, 0.25, 4)]
    assert result.epsilon == pytest.approx(opacus_epsilon("rdp", [(1.5, 0.25, 4)]), rel=1e-9)


@pytest.mark.parametrize(
    ("budget", "delta", "culprit"),
    [
        (float("inf"), DELTA, "privacy.epsilon"),
        (float("nan"), DELTA, "privacy.epsilon"),
        (0.0, DELTA, "privacy.epsilon"),
        (-1.0, DELTA, "privacy.epsilon"),
        (8.0, 0.0, "privacy.delta"),
        (8.0, 1.0, "privacy.delta"),
        (8.0, float("nan"), "privacy.delta"),
    ],
)
def test_meaningless_budget_or_delta_is_refused(tmp_path, budget, delta, culprit):
    with pytest.raises(ConfigError) as info:
        PrivacyLedger(tmp_path / "l.json", budget, delta, "rdp")
    assert str(info.value).startswith(culprit) and "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_budget_below_any_noise_is_one_line_naming_what_is_needed(tmp_path, mechanism):
    ledger = PrivacyLedger(tmp_path / "l.json", 0.001, DELTA, mechanism)
    with pytest.raises(ConfigError) as info:
        ledger.calibrate(0.25, 12)
    message = str(info.value)
    assert message.startswith("privacy.epsilon: 0.001") and "\n" not in message
    needed = float(message.rsplit("at least about ", 1)[1])
    # Independent: at the largest noise Opacus tries, the plan costs about what is said to be needed.
    assert opacus_epsilon(mechanism, [(1e6, 0.25, 12)]) == pytest.approx(needed, rel=1e-2)
    assert ledger.noise_multiplier is None


def test_institutions_with_the_same_history_compose_it_once_and_each_ledger_re_derives_its_epsilon(tmp_path):
    """The composition is cached on its pure inputs (accountant, merged history, delta): a second
    institution reserving the same round pays no second PRV composition, and neither file depends on
    the cache: each one's entries, composed by Opacus afresh, give the epsilon it recorded."""
    rate, steps = 0.37, 3  # a sample rate no other test uses, so the first reservation misses
    ledgers = [PrivacyLedger(tmp_path / f"client-{i}.json", 8.0, DELTA, "prv") for i in range(2)]
    for ledger in ledgers:
        ledger.calibrate(rate, 10 * steps)
    before = composed.cache_info()
    first = ledgers[0].reserve(1, rate, steps)
    middle = composed.cache_info()
    second = ledgers[1].reserve(1, rate, steps)
    after = composed.cache_info()
    assert middle.misses == before.misses + 1
    assert (after.hits, after.misses) == (middle.hits + 1, middle.misses)
    assert second.epsilon == first.epsilon > 0
    for ledger in ledgers:
        data = json.loads(ledger.path.read_text())
        fresh = opacus_epsilon("prv", summed_per_mechanism(data["entries"]))
        assert data["entries"][-1]["epsilon"] == pytest.approx(fresh, rel=1e-9)
