"""The audit of a distributed-noise run (simulations.secure_sum_audit): round 0's unmasked sum less the
institutions' exact statistics is the noise they added together; over rounds its std is the claimed
sigma C, no institution's share alone has it, and one institution adding no share is caught. The real
server body (server.secure_statistics, server.app.run_server) drives the real ClientApps of three
virtual institutions (tiny-BERT, helpers.secagg); m = 3 (no tolerated dropout or colluder)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord

from fedlora.client import statistics
from fedlora.client.ledger import PrivacyLedger
from fedlora.client.recipe import STATISTICS_SHARE, statistics_noise
from fedlora.common import protocol as P
from fedlora.common.adapter import adapter_state
from fedlora.common.config import FedloraConfig, load_config
from fedlora.common.errors import FedloraError
from fedlora.common.noise_check import NoiseSums, noise_check, samples_to_detect
from fedlora.common.protocol import STATISTICS_SENSITIVITY
from fedlora.server.app import ServerSettings, as_record, run_server, server_workbench
from fedlora.server.secure_statistics import secure_statistics
from fedlora.server.strategy import build_strategy
from fedlora.simulations.report import audit_section
from fedlora.simulations.secure_sum_audit import (
    RESULT_FILE,
    audit_secure_sum,
    claimed_sigma,
    exact_sum,
    require_enough_noise,
    sum_noise,
    sum_recorder,
)
from fedlora.simulations.virtual_client import ledger_file
from helpers.secagg import NODES, SecAggGrid, inside_a_serverapp

CONFIG = [
    "model.source=tiny-bert",
    "data.max_length=32",
    "training.local_steps=1",
    "training.batch_size=8",
    "training.seed=3",
    "privacy.epsilon=8",
    "privacy.accountant=rdp",
    "federation.rounds=1",
    "federation.min_clients=3",
    "federation.fraction_evaluate=0",
    "federation.central_eval=false",
    "federation.secure_aggregation=true",
    "simulation.num_clients=3",
    "simulation.partition=iid",
]
# 8 classes x (32 + 1) = 264 noised values a round; one of 3 shares missing (std ratio sqrt(2/3)) needs
# samples_to_detect(sqrt(2/3)) = 467 of them: 4 rounds hold more than twice that.
ROUNDS = 4


@pytest.fixture(autouse=True)
def _inside_a_serverapp(monkeypatch) -> None:
    inside_a_serverapp(monkeypatch)


@pytest.fixture(scope="module")
def cfg() -> FedloraConfig:
    return load_config(overrides=CONFIG)


class Shares:
    """Wraps the release's noise draw: records each institution's own noise (released less exact), and
    with ``silent`` the first institution of every round adds none (its noise std set to 0)."""

    def __init__(self, monkeypatch, silent: bool = False) -> None:
        self.draw, self.silent, self.noise = statistics.gaussian_release, silent, []
        monkeypatch.setattr(statistics, "gaussian_release", self)

    def __call__(self, sums, counts, noise_std, generator=None):
        if self.silent and len(self.noise) % len(NODES) == 0:
            noise_std = 0.0
        noisy_sums, noisy_counts = self.draw(sums, counts, noise_std, generator)
        self.noise.append(torch.cat([(noisy_sums - sums).flatten(), noisy_counts - counts]).numpy())
        return noisy_sums, noisy_counts


def summed_noise(cfg: FedloraConfig, root: Path, shares: Shares) -> tuple[NoiseSums, list[NoiseSums]]:
    """ROUNDS rounds of round 0 under secure aggregation (fresh ledgers each): the noise sums of the
    unmasked sum against the claimed sigma C, and of each institution's share alone against the same."""
    bench, _ = server_workbench(cfg)
    arrays = as_record(adapter_state(bench.built.model))
    exact = exact_sum(cfg)
    total, alone = NoiseSums(), [NoiseSums()] * len(NODES)
    for r in range(ROUNDS):
        run_dir = root / f"round-{r}"
        unmasked = []
        strategy = build_strategy(cfg, bench.built.fingerprint, len(NODES))
        assert secure_statistics(SecAggGrid(cfg, run_dir), strategy, arrays, cfg, unmasked.append) is not None
        claimed = claimed_sigma(cfg, run_dir) * STATISTICS_SENSITIVITY
        total += sum_noise(unmasked[0], exact, claimed)
        own = shares.noise[-len(NODES) :]
        alone = [a + NoiseSums.of(float(n @ n), n.size, claimed) for a, n in zip(alone, own, strict=True)]
    return total, alone


def test_the_sums_noise_has_the_claimed_std_and_no_share_alone_does(cfg, tmp_path, monkeypatch):
    torch.manual_seed(0)
    total, alone = summed_noise(cfg, tmp_path, Shares(monkeypatch))
    check = noise_check(total)
    assert check.samples == ROUNDS * 8 * 33 >= 2 * samples_to_detect(math.sqrt(2 / 3))
    assert check.passed and check.ratio_interval[0] < 1.0 < check.ratio_interval[1]
    for share in map(noise_check, alone):
        # Each share is sigma C / sqrt(3): the check against the sum's claim rejects it.
        assert not share.passed and share.ratio == pytest.approx(1 / math.sqrt(3), abs=0.1)


def test_one_institution_adding_no_share_is_caught(cfg, tmp_path, monkeypatch):
    torch.manual_seed(0)
    total, alone = summed_noise(cfg, tmp_path, Shares(monkeypatch, silent=True))
    check = noise_check(total)
    assert not check.passed
    assert check.ratio == pytest.approx(math.sqrt(2 / 3), abs=0.08)
    assert noise_check(alone[0]).ratio == 0.0


def federation(cfg: FedloraConfig, run_dir: Path, lost=()) -> None:
    """A whole federation whose ServerApp hands round 0's sum to the audit's recorder, as an audited
    simulation's does (simulations.run)."""
    settings = ServerSettings(cfg, run_dir, len(NODES), on_secure_sum=sum_recorder(run_dir))
    run_server(SecAggGrid(cfg, run_dir, lost), settings)


def test_the_audit_of_a_run_checks_its_sum_and_says_what_it_could_catch(cfg, tmp_path, monkeypatch):
    torch.manual_seed(0)
    federation(cfg, tmp_path)
    audit = audit_secure_sum(cfg, tmp_path)
    assert audit is not None and audit.check is not None and audit.check.passed
    assert (audit.institutions, audit.survivors, audit.honest) == (3, 3, 3)
    assert audit.check.samples == 8 * 33 < audit.samples_to_catch_missing_share == 467
    assert json.loads((tmp_path / RESULT_FILE).read_text())["check"]["passed"] is True
    section = audit_section([], audit)
    assert "unmasked sum of 3 of 3 institutions" in section and "this run's 264 cannot catch it" in section
    require_enough_noise(audit, tmp_path / RESULT_FILE)


def test_an_implementation_adding_no_noise_fails_the_audit_in_one_line(cfg, tmp_path, monkeypatch):
    real = statistics.gaussian_release
    monkeypatch.setattr(statistics, "gaussian_release", lambda s, c, _std, g=None: real(s, c, 0.0, g))
    federation(cfg, tmp_path)
    audit = audit_secure_sum(cfg, tmp_path)
    assert audit is not None and not audit.check.passed and audit.check.ratio < 0.01
    with pytest.raises(FedloraError) as err:
        require_enough_noise(audit, tmp_path / RESULT_FILE)
    assert "an institution added less than its share" in str(err.value) and "\n" not in str(err.value)
    assert "| NO |" in audit_section([], audit)


def test_a_plain_run_has_no_sum_to_audit_and_a_discarded_round_says_so(cfg, tmp_path):
    plain = load_config(overrides=[*CONFIG, "federation.secure_aggregation=false"])
    assert audit_secure_sum(plain, tmp_path) is None
    federation(cfg, tmp_path, lost=[(P.MASKED_INPUT, NODES[2])])  # no dropout tolerated: discarded
    audit = audit_secure_sum(cfg, tmp_path)
    assert audit is not None and audit.check is None and "discarded" in audit.skipped
    assert "Not checked: round 0 was discarded" in audit_section([], audit)


def one_other(monkeypatch, *overrides: str) -> FedloraConfig:
    """The first institution of every SecAggGrid runs with ``overrides`` (its own privacy settings; its
    identity as the grid gave it)."""
    other = load_config(overrides=[*CONFIG, *overrides])
    grid_init = SecAggGrid.__init__

    def init(self, config, run_dir, lost=()):
        grid_init(self, config, run_dir, lost)
        first = self.setups[NODES[0]]
        self.setups[NODES[0]] = replace(first, cfg=replace(other, security=first.cfg.security))

    monkeypatch.setattr(SecAggGrid, "__init__", init)
    return other


def test_an_institution_with_a_smaller_budget_is_covered_by_the_sum(cfg, tmp_path, monkeypatch):
    """One of the three at epsilon 2, the others at 8: every ledger's claim must hold for the sum."""
    torch.manual_seed(0)
    one_other(monkeypatch, "privacy.epsilon=2")
    total, _ = summed_noise(cfg, tmp_path, Shares(monkeypatch))
    assert noise_check(total).passed


def planned(epsilon: float) -> float:
    """The planner's round-0 noise multiplier at ``epsilon`` (client.recipe: its statistics share)."""
    inst = SimpleNamespace(epsilon=epsilon, delta=1e-5, accountant="rdp")
    return statistics_noise(inst, STATISTICS_SHARE)


def round_zero(cfg: FedloraConfig, run_dir: Path, grid: SecAggGrid) -> tuple[dict[int, float], list[float]]:
    """Round 0 under secure aggregation: each node's advertised multiplier and the masked replies'
    noise std (each institution's share)."""
    bench, _ = server_workbench(cfg)
    strategy = build_strategy(cfg, bench.built.fingerprint, len(NODES))
    assert secure_statistics(grid, strategy, as_record(adapter_state(bench.built.model)), cfg) is not None
    stage = {r.content[P.CONFIG][P.SECAGG_STAGE]: [] for r in grid.received}
    for reply in grid.received:
        stage[reply.content[P.CONFIG][P.SECAGG_STAGE]].append(reply)
    adverts = {r.metadata.src_node_id: r.content[P.CONFIG][P.SECAGG_NOISE] for r in stage[P.ADVERTISE_KEYS]}
    return adverts, [r.content[P.METRICS][P.NOISE_STD] for r in stage[P.MASKED_INPUT]]


def test_every_share_uses_the_largest_advertised_noise_and_every_ledger_is_charged_at_it(
    cfg, tmp_path, monkeypatch, opacus_epsilon
):
    """The epsilon-2 institution advertises the largest multiplier; all three add sigma C / sqrt(3) of
    it and charge both epsilons at it (re-derived by Opacus): the epsilon-8 ones spend less than their
    plan, and their rounds keep the noise calibrated for the plan."""
    round_zero(cfg, tmp_path / "all-at-8", SecAggGrid(cfg, tmp_path / "all-at-8"))
    one_other(monkeypatch, "privacy.epsilon=2")
    adverts, shares = round_zero(cfg, tmp_path, SecAggGrid(cfg, tmp_path))
    sigma = planned(2.0)
    assert adverts == pytest.approx({NODES[0]: sigma, NODES[1]: planned(8.0), NODES[2]: planned(8.0)})
    assert sigma > planned(8.0)
    assert shares == pytest.approx([sigma * STATISTICS_SENSITIVITY / math.sqrt(3)] * 3)
    for pid, budget in enumerate((2.0, 8.0, 8.0)):
        ledger = PrivacyLedger.from_config(replace(cfg.privacy, epsilon=budget), ledger_file(tmp_path, pid))
        (entry,) = ledger.entries
        share = sigma / math.sqrt(3)
        assert (entry.noise_multiplier, entry.share_noise_multiplier) == pytest.approx((sigma, share))
        assert entry.epsilon == pytest.approx(opacus_epsilon("rdp", [(sigma, 1.0, 1)]), rel=1e-6)
        assert entry.epsilon_alone == pytest.approx(opacus_epsilon("rdp", [(share, 1.0, 1)]), rel=1e-6)
        if budget == 8.0:
            assert entry.epsilon < opacus_epsilon("rdp", [(planned(8.0), 1.0, 1)])
            as_planned = PrivacyLedger.from_config(cfg.privacy, ledger_file(tmp_path / "all-at-8", pid))
            assert ledger.noise_multiplier == as_planned.noise_multiplier  # the rounds' noise: as planned


class LoweringGrid(SecAggGrid):
    """A coordinator that relays every advertised multiplier as ``relayed`` (or drops one node's)."""

    relayed: object = 0.01

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        for msg in messages:
            if P.SECAGG_NOISES in msg.content:
                noises = {n: self.relayed for n in msg.content[P.SECAGG_NOISES]}
                msg.content[P.SECAGG_NOISES] = ConfigRecord(noises)
        return super().send_and_receive(messages, timeout)


def test_the_coordinator_cannot_lower_an_institutions_noise(cfg, tmp_path, monkeypatch):
    """Each multiplier is signed with its advert: relayed lower, no advert verifies (each institution's
    own among them), so every institution refuses the round before anything is released or charged."""
    one_other(monkeypatch, "privacy.epsilon=2")
    grid = LoweringGrid(cfg, tmp_path)
    bench, _ = server_workbench(cfg)
    strategy = build_strategy(cfg, bench.built.fingerprint, len(NODES))
    assert secure_statistics(grid, strategy, as_record(adapter_state(bench.built.model)), cfg) is None
    for pid, node in enumerate(NODES):
        assert not ledger_file(tmp_path, pid).exists()
        last = (tmp_path / "audit" / f"client-{pid}-errors.log").read_text().strip().splitlines()[-1]
        assert last.endswith(f"the roster misstates node {node}'s own keys or identity")


class EquivocatingGrid(SecAggGrid):
    """A coordinator that shows the first institution the true multipliers and the others a roster in
    which the first one advertised as they did (so they would add shares of their own, smaller noise)."""

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        for msg in messages:
            if P.SECAGG_NOISES in msg.content and msg.metadata.dst_node_id != NODES[0]:
                noises = dict(msg.content[P.SECAGG_NOISES])
                noises[str(NODES[0])] = noises[str(NODES[1])]
                msg.content[P.SECAGG_NOISES] = ConfigRecord(noises)
        return super().send_and_receive(messages, timeout)


def test_a_coordinator_showing_institutions_different_multipliers_gets_no_sum(cfg, tmp_path, monkeypatch):
    """The agreed sigma is bound into every key: the first institution (sigma of epsilon 2) and the
    others (sigma of epsilon 8) cannot open each other's shares, so no sum with less noise than the
    first one claims is unmasked."""
    one_other(monkeypatch, "privacy.epsilon=2")
    grid = EquivocatingGrid(cfg, tmp_path)
    bench, _ = server_workbench(cfg)
    strategy = build_strategy(cfg, bench.built.fingerprint, len(NODES))
    assert secure_statistics(grid, strategy, as_record(adapter_state(bench.built.model)), cfg) is None
    assert P.UNMASK not in grid.stages
    masked = [r for r in grid.received if not r.has_error() and P.MASKED in r.content[P.ARRAYS]]
    assert masked == []  # every institution refused the masked input: no masked vector left


def test_a_malformed_relayed_multiplier_is_refused_in_one_line_and_nothing_is_charged(cfg, tmp_path):
    grid = LoweringGrid(cfg, tmp_path)
    grid.relayed = -1.0
    bench, _ = server_workbench(cfg)
    strategy = build_strategy(cfg, bench.built.fingerprint, len(NODES))
    assert secure_statistics(grid, strategy, as_record(adapter_state(bench.built.model)), cfg) is None
    for pid in range(len(NODES)):
        assert not ledger_file(tmp_path, pid).exists()
        last = (tmp_path / "audit" / f"client-{pid}-errors.log").read_text().strip().splitlines()[-1]
        assert last.startswith("fedlora.common.errors.AdapterError: roster noise of node ")
        assert last.endswith("noise multiplier -1.0, expected a finite number >= 0 (0: no DP noise)")


def test_an_institution_without_dp_still_adds_its_share_of_the_peers_noise(cfg, tmp_path, monkeypatch):
    """Privacy off, it advertises 0 and has no ledger, but its share keeps the sum at the peers' claim."""
    one_other(monkeypatch, "privacy.enabled=false")
    adverts, shares = round_zero(cfg, tmp_path, SecAggGrid(cfg, tmp_path))
    assert adverts[NODES[0]] == 0.0
    assert shares == pytest.approx([planned(8.0) * STATISTICS_SENSITIVITY / math.sqrt(3)] * 3)
    assert not ledger_file(tmp_path, 0).exists()
