"""Distributed noise: each institution's share, and its accounting with and without the aggregation
assumption, in common.distributed_noise, the ledger (both epsilons; old ledgers still load), check's
plan and the model card's sentence. Every epsilon is re-derived by an Opacus accountant of the test's
own, with Opacus' own RDP function (not the memo)."""

from __future__ import annotations

import json
import math

import pytest

from fedlora.client.ledger import PrivacyLedger
from fedlora.common.accounting import Accountant, Composition
from fedlora.common.distributed_noise import NoiseSharing
from fedlora.common.errors import CheckpointError, ConfigError
from fedlora.common.model_card import aggregation_assumption

DELTA = 1e-5
SIGMA, CLIP, RATE, STEPS = 1.1, 0.5, 0.05, 20
# Ten sampled, two may drop out, one may collude: seven shares in every sum.
SHARING = NoiseSharing(SIGMA, CLIP, sampled=10, dropouts=2, colluders=1)
OLD_ENTRY_KEYS = {"round", "noise_multiplier", "sample_rate", "steps", "epsilon", "time"}



def test_each_share_is_sigma_c_over_root_m_and_m_shares_sum_to_the_central_noise():
    assert SHARING.honest == 7
    assert SHARING.share_std == SIGMA * CLIP / math.sqrt(7)
    assert SHARING.share_multiplier == SIGMA / math.sqrt(7)
    # The variances of the m independent shares add up to the central noise's.
    assert math.sqrt(SHARING.honest * SHARING.share_std**2) == pytest.approx(SIGMA * CLIP, rel=1e-12)
    assert NoiseSharing(SIGMA, CLIP, sampled=1, dropouts=0, colluders=0).share_std == SIGMA * CLIP


@pytest.mark.parametrize("dropouts, colluders", [(3, 2), (5, 0), (0, 6)])
def test_no_honest_institution_guaranteed_is_refused_in_one_line(dropouts, colluders):
    with pytest.raises(ConfigError) as err:
        NoiseSharing(SIGMA, CLIP, sampled=5, dropouts=dropouts, colluders=colluders)
    text = str(err.value)
    assert "\n" not in text
    assert f"5 sampled - {dropouts} tolerated dropouts - {colluders} tolerated colluders" in text
    assert "expected at least 1" in text


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_with_aggregation_the_central_epsilon_without_it_the_share_alone(opacus_epsilon, mechanism):
    accountant = Accountant(mechanism, DELTA)
    central = opacus_epsilon(mechanism, [(SIGMA, RATE, STEPS)])
    alone = opacus_epsilon(mechanism, [(SIGMA / math.sqrt(7), RATE, STEPS)])
    assert accountant.epsilon(SHARING.aggregated(RATE, STEPS)) == pytest.approx(central, rel=1e-9)
    assert accountant.epsilon(SHARING.alone(RATE, STEPS)) == pytest.approx(alone, rel=1e-9)
    assert alone > 1.5 * central


def shared_ledger(tmp_path, mechanism="rdp") -> PrivacyLedger:
    """Round 1 ordinary (full local noise), round 2 with distributed noise, round 3 ordinary again."""
    ledger = PrivacyLedger(tmp_path / "l.json", 50.0, DELTA, mechanism)
    ledger.noise_multiplier = SIGMA
    ledger.reserve(1, RATE, STEPS)
    ledger.reserve(2, RATE, STEPS, sharing=SHARING)
    ledger.reserve(3, RATE, STEPS)
    return ledger


def test_the_ledger_records_both_epsilons_composed_by_its_accountant(tmp_path, opacus_epsilon):
    mechanism = "rdp"  # prv composes the same events (the test above), at several times the cost
    ledger = shared_ledger(tmp_path, mechanism)
    first, shared, after = PrivacyLedger(tmp_path / "l.json", 50.0, DELTA, mechanism).entries
    assert first.share_noise_multiplier is None and first.epsilon_alone is None  # nothing shared yet
    assert shared.noise_multiplier == SIGMA and shared.share_noise_multiplier == SIGMA / math.sqrt(7)
    share = SIGMA / math.sqrt(7)
    assert shared.epsilon == pytest.approx(opacus_epsilon(mechanism, [(SIGMA, RATE, 2 * STEPS)]), rel=1e-9)
    assert shared.epsilon_alone == pytest.approx(
        opacus_epsilon(mechanism, [(SIGMA, RATE, STEPS), (share, RATE, STEPS)]), rel=1e-9
    )
    # Later rounds keep recording both; the spend with the assumption is the central one.
    assert after.epsilon == pytest.approx(opacus_epsilon(mechanism, [(SIGMA, RATE, 3 * STEPS)]), rel=1e-9)
    assert after.epsilon_alone == pytest.approx(
        opacus_epsilon(mechanism, [(SIGMA, RATE, STEPS), (share, RATE, STEPS), (SIGMA, RATE, STEPS)]),
        rel=1e-9,
    )
    assert ledger.spent_alone == after.epsilon_alone > ledger.spent
    assert ledger.accounting.epsilon(ledger.composition(alone=True)) == pytest.approx(after.epsilon_alone)
    assert ledger.accounting.epsilon(Composition((SHARING.aggregated(RATE, STEPS),))) == pytest.approx(
        opacus_epsilon(mechanism, [(SIGMA, RATE, STEPS)]), rel=1e-9
    )


def test_an_old_ledger_loads_and_ordinary_rounds_keep_its_format(tmp_path):
    path = tmp_path / "old.json"
    old = {
        "version": 1,
        "accountant": "rdp",
        "delta": DELTA,
        "budget": 50.0,
        "noise_multiplier": SIGMA,
        "privacy_unit": "row",
        "entries": [
            {"round": 1, "noise_multiplier": SIGMA, "sample_rate": RATE, "steps": STEPS, "epsilon": 1.0,
             "time": 0.0, "federated": True},
        ],
    }
    path.write_text(json.dumps(old))
    ledger = PrivacyLedger(path, 50.0, DELTA, "rdp")
    assert ledger.spent == 1.0 and ledger.spent_alone is None
    ledger.reserve(2, RATE, STEPS)
    entries = json.loads(path.read_text())["entries"]
    assert set(entries[0]) == OLD_ENTRY_KEYS | {"federated"} and set(entries[1]) == OLD_ENTRY_KEYS


def test_a_shared_entry_without_its_epsilon_alone_is_refused(tmp_path):
    shared_ledger(tmp_path)
    data = json.loads((tmp_path / "l.json").read_text())
    del data["entries"][1]["epsilon_alone"]
    (tmp_path / "l.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="share_noise_multiplier"):
        PrivacyLedger(tmp_path / "l.json", 50.0, DELTA, "rdp")


def test_a_share_raised_after_the_fact_is_refused_before_the_next_round(tmp_path):
    """A larger recorded share would compose, without the assumption, below what the ledger recorded."""
    shared_ledger(tmp_path)
    data = json.loads((tmp_path / "l.json").read_text())
    data["entries"][1]["share_noise_multiplier"] = SIGMA
    (tmp_path / "l.json").write_text(json.dumps(data))
    ledger = PrivacyLedger(tmp_path / "l.json", 50.0, DELTA, "rdp")
    with pytest.raises(CheckpointError, match="without the aggregation assumption"):
        ledger.reserve(4, RATE, STEPS)


def test_check_plans_with_the_spend_without_aggregation(tmp_path, make_config):
    from fedlora.client.cli import plan
    from fedlora.common.workbench import prepare

    ledger = shared_ledger(tmp_path)

    def planned(path):
        cfg = make_config(
            {
                "training": {"batch_size": 4, "local_steps": 2},
                "privacy": {"epsilon": 8.0, "accountant": "rdp", "ledger_path": str(path)},
            }
        )
        bench = prepare(cfg)
        return plan(cfg, bench.built.model, bench.data.train)[1]

    budget = planned(ledger.path)
    assert budget["spent"] == ledger.spent and budget["spent_alone"] == ledger.spent_alone
    assert planned(tmp_path / "fresh.json")["spent_alone"] is None


def test_the_model_card_states_the_assumption():
    line = aggregation_assumption(SHARING)
    assert "\n" not in line
    assert "10 sampled - 2 tolerated dropouts - 1 tolerated colluders = 7 institutions" in line
    assert "at most 1 of the institutions collude" in line and "sqrt(7)" in line
    assert "learns only that sum" in line
