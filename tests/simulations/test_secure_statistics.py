"""Round 0 under secure aggregation (federation.secure_aggregation): the real server body
(server.secure_statistics, server.app.run_server) drives the real ClientApp (audit and failure mods,
client.secure_statistics, tiny-BERT) of three virtual institutions through a grid that runs them in this
process (helpers.secagg)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from opacus.accountants import create_accountant

from fedlora.client.ledger import STATISTICS_ROUND, PrivacyLedger
from fedlora.common import protocol as P
from fedlora.common.adapter import adapter_state
from fedlora.common.config import FedloraConfig, load_config
from fedlora.common.distributed_noise import NoiseSharing
from fedlora.common.errors import ConfigError
from fedlora.common.secure_aggregation import settings
from fedlora.common.secure_aggregation.settings import STATISTICS_QUANTISATION_BITS
from fedlora.server.app import ServerSettings, as_record, run_server, server_workbench
from fedlora.server.secure_statistics import secure_statistics
from fedlora.server.strategy import build_strategy
from fedlora.simulations.virtual_client import ledger_file
from helpers.secagg import NODES, SecAggGrid, inside_a_serverapp

BASE = [
    "model.source=tiny-bert",
    "data.max_length=32",
    "training.local_steps=1",
    "training.batch_size=8",
    "training.seed=3",
    "privacy.enabled=false",
    "federation.rounds=1",
    "federation.min_clients=3",
    "federation.fraction_evaluate=0",
    "federation.central_eval=false",
    "simulation.num_clients=3",
    "simulation.partition=iid",
]
SECURE = ["federation.secure_aggregation=true"]


@pytest.fixture(autouse=True)
def _inside_a_serverapp(monkeypatch) -> None:
    inside_a_serverapp(monkeypatch)


def config(*extra: str) -> FedloraConfig:
    return load_config(overrides=[*BASE, *extra])


def head_of(cfg: FedloraConfig, run_dir: Path, lost=(), plain_nodes=NODES) -> tuple[dict, dict, SecAggGrid]:
    """Round 0's head under secure aggregation, and the plain summed release's head of ``plain_nodes``."""
    bench, _ = server_workbench(cfg)
    arrays = as_record(adapter_state(bench.built.model))
    secure_grid = SecAggGrid(cfg, run_dir / "secure", lost)
    strategy = build_strategy(cfg, bench.built.fingerprint, len(NODES))
    secure = secure_statistics(secure_grid, strategy, arrays, cfg)
    plain_grid = SecAggGrid(cfg, run_dir / "plain")
    plain_strategy = build_strategy(cfg, bench.built.fingerprint, len(NODES))
    asked = plain_strategy.configure_statistics(arrays, plain_grid)
    messages = [m for m in asked if m.metadata.dst_node_id in plain_nodes]
    plain = plain_strategy.aggregate_statistics(plain_grid.send_and_receive(messages), cfg.model.head_scale)
    as_numpy = lambda record: {k: v.numpy() for k, v in record.items()}  # noqa: E731
    return as_numpy(secure) if secure is not None else {}, as_numpy(plain), secure_grid


def assert_same_head(secure: dict, plain: dict) -> None:
    assert secure.keys() == plain.keys()
    for key in plain:
        # the sums differ by at most 3 quantisation steps of 2^21 / 2^40 per value: far below fp32's noise
        np.testing.assert_allclose(secure[key], plain[key], rtol=1e-4, atol=1e-4, err_msg=key)


def test_without_noise_the_securely_summed_head_is_the_plain_summed_head_and_the_server_sees_masks(tmp_path):
    secure, plain, grid = head_of(config(*SECURE), tmp_path)
    assert_same_head(secure, plain)
    assert grid.stages.count(P.UNMASK) == 3
    masked = [
        m.content[P.ARRAYS][P.MASKED].numpy()
        for m in grid.received
        if m.content[P.CONFIG].get(P.SECAGG_STAGE) == P.MASKED_INPUT
    ]
    assert len(masked) == 3
    ceiling = 2 ** (STATISTICS_QUANTISATION_BITS + 1)  # every quantised value, and any sum of 3, lies below
    for vector in masked:
        assert vector.dtype == np.uint64
        # Uniform in Z_2^64: no value in the quantised range, the top bit set about half the time and the
        # mean at 2^63 (4 standard errors of a uniform's mean).
        assert (vector < ceiling).sum() == 0
        share = vector / 2.0**64
        assert abs(share.mean() - 0.5) < 4 / math.sqrt(12 * vector.size)
        assert abs((vector >= 2**63).mean() - 0.5) < 4 * 0.5 / math.sqrt(vector.size)
    # Nothing else the server received holds a float array: keys and shares are bytes.
    for reply in grid.received:
        for array in reply.content[P.ARRAYS].values():
            assert array.dtype in ("uint8", "uint64")


@pytest.mark.parametrize("stage", [P.MASKED_INPUT, P.UNMASK])
def test_one_institution_lost_after_sharing_keys_leaves_the_sum_recoverable(tmp_path, stage):
    """Lost at the masked input: its pairwise masks are rebuilt from shares of its key and the sum is
    the other two's; lost at the unmask: its vector is in the sum, the other two's shares suffice."""
    cfg = config(*SECURE, "federation.secagg_threshold=2", "federation.secagg_dropouts=1")
    kept = NODES[:2] if stage == P.MASKED_INPUT else NODES
    secure, plain, _ = head_of(cfg, tmp_path, lost=[(stage, NODES[2])], plain_nodes=kept)
    assert_same_head(secure, plain)


def test_a_masked_reply_whose_epsilon_went_down_is_left_out_as_a_dropout(tmp_path):
    """The reply screen's memory of each node's cumulative epsilon holds under secure aggregation: an
    institution whose ledger was lost or reset (its epsilon below what it reported before) has its masked
    vector left out, its self-mask never asked for, and the sum is the other two's."""
    cfg = config(*SECURE, "federation.secagg_threshold=2", "federation.secagg_dropouts=1")
    bench, _ = server_workbench(cfg)
    arrays = as_record(adapter_state(bench.built.model))
    strategy = build_strategy(cfg, bench.built.fingerprint, len(NODES))
    strategy.screen.epsilons[NODES[2]] = 5.0  # reported before; the institution now reports 0
    grid = SecAggGrid(cfg, tmp_path / "secure")
    secure = secure_statistics(grid, strategy, arrays, cfg)
    record = strategy.rounds[-1]
    assert [d["node"] for d in record.dropped] == [NODES[2]]
    assert "ledger was lost or reset" in record.dropped[0]["reason"]
    assert [c["node"] for c in record.clients] == list(NODES[:2])
    _, plain, _ = head_of(cfg, tmp_path / "plain", plain_nodes=NODES[:2])
    assert_same_head({k: v.numpy() for k, v in secure.items()}, plain)


def test_fewer_survivors_than_the_tolerated_dropouts_allow_discard_the_round_and_the_run_goes_on(
    tmp_path, caplog
):
    """Two of three lost with threshold 2: below the threshold. One of three lost with no tolerated
    dropout: above the threshold, but the sum would hold fewer than m noise shares. Nothing is
    unmasked in either; the run trains its round without the statistics head."""
    for name, extra, lost in (
        ("threshold", ["federation.secagg_threshold=2", "federation.secagg_dropouts=1"], NODES[1:]),
        ("m", ["federation.secagg_threshold=2"], NODES[2:]),
    ):
        cfg = config(*SECURE, *extra)
        grid = SecAggGrid(cfg, tmp_path / name, lost=[(P.MASKED_INPUT, n) for n in lost])
        with caplog.at_level("WARNING", logger="fedlora.server"):
            history = run_server(grid, ServerSettings(cfg, tmp_path / name, len(NODES)))
        assert P.UNMASK not in grid.stages
        assert "the run goes on without the statistics head" in caplog.text
        assert [e["round"] for e in history] == [0, 1]
        assert history[0]["clients"] == [] and len(history[1]["clients"]) == 3
        caplog.clear()


def prv(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = create_accountant("prv")
    accountant.history = history
    return accountant.get_epsilon(delta=delta)


def test_each_ledger_records_both_epsilons_and_the_card_states_the_assumption(tmp_path):
    cfg = config(
        *SECURE,
        "privacy.enabled=true",
        "privacy.epsilon=8",
        "federation.secagg_threshold=2",
        "federation.secagg_dropouts=1",
    )
    run_server(SecAggGrid(cfg, tmp_path), ServerSettings(cfg, tmp_path, len(NODES)))
    delta = cfg.privacy.delta
    m = len(NODES) - 1
    for pid in range(len(NODES)):
        ledger = PrivacyLedger.from_config(cfg.privacy, ledger_file(tmp_path, pid))
        entry = ledger.entries[0]
        assert entry.round == STATISTICS_ROUND
        sigma = entry.noise_multiplier
        assert entry.share_noise_multiplier == pytest.approx(sigma / math.sqrt(m))
        assert entry.epsilon == pytest.approx(prv([(sigma, 1.0, 1)], delta), abs=1e-6)
        assert entry.epsilon_alone == pytest.approx(prv([(sigma / math.sqrt(m), 1.0, 1)], delta), abs=1e-6)
        assert entry.epsilon_alone > entry.epsilon
        lines = (tmp_path / "audit" / f"client-{pid}.jsonl").read_text().splitlines()
        audit = [json.loads(line) for line in lines]
        stages = [line["configs"][P.CONFIG].get(P.SECAGG_STAGE) for line in audit[:5]]
        assert stages == list(P.SECAGG_STAGES)  # every step left through the audit mod
    history = json.loads((tmp_path / "history.json").read_text())
    share = min(c[P.NOISE_STD] for c in history[0]["clients"])
    card = (tmp_path / "adapter" / "README.md").read_text()
    sharing = NoiseSharing(share * math.sqrt(m) / P.STATISTICS_SENSITIVITY, P.STATISTICS_SENSITIVITY, 3, 1, 0)
    assert "distributed noise: each institution added Gaussian noise of std sigma x C / sqrt(2)" in card
    assert f"(sigma {sharing.sigma:g}" in card


def test_persons_are_released_per_person_under_secure_aggregation(tmp_path, opacus_epsilon):
    """Three sites whose persons of class a wrote 5 notes each and of class b one: the securely summed
    counts are persons (the head's prior is the persons' share, 1/4 for a, not the rows' 5/8), and each
    ledger, kept in the person unit, records the release at round 0 with both epsilons."""
    rows = [
        {"text": f"note {n} of {site} {label}{person}", "label": label, "patient": f"{site}-{label}{person}",
         "site": site}
        for site in ("north", "east", "south")
        for label, persons, notes in (("a", 4, 5), ("b", 12, 1))
        for person in range(persons)
        for n in range(notes)
    ]
    path = tmp_path / "notes.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    cfg = config(
        *SECURE,
        f"data.path={path}",
        "data.privacy_unit=patient",
        "simulation.partition=column",
        "simulation.partition_column=site",
        "privacy.enabled=true",
        "privacy.accountant=rdp",
        "privacy.epsilon=400",  # the release at epsilon 100: count noise of a few hundredths
    )
    bench, _ = server_workbench(cfg)
    grid = SecAggGrid(cfg, tmp_path)
    strategy = build_strategy(cfg, bench.built.fingerprint, len(NODES))
    head = secure_statistics(grid, strategy, as_record(adapter_state(bench.built.model)), cfg)
    bias = next(v.numpy() for k, v in head.items() if ".classifier." in k and k.endswith(".bias"))
    np.testing.assert_allclose(np.exp(bias), [0.25, 0.75], atol=0.02)
    for pid in range(len(NODES)):
        ledger_path = ledger_file(tmp_path, pid)
        assert json.loads(ledger_path.read_text())["privacy_unit"] == "patient"
        entry = PrivacyLedger.from_config(cfg.privacy, ledger_path).entries[0]
        assert (entry.round, entry.sample_rate, entry.steps) == (STATISTICS_ROUND, 1.0, 1)
        summed = opacus_epsilon("rdp", [(entry.noise_multiplier, 1.0, 1)])
        alone = opacus_epsilon("rdp", [(entry.share_noise_multiplier, 1.0, 1)])
        assert (entry.epsilon, entry.epsilon_alone) == pytest.approx((summed, alone), rel=1e-6)


def test_the_threshold_is_checked_against_the_federation_in_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(
            overrides=[*BASE, *SECURE, "federation.secagg_threshold=3", "federation.secagg_dropouts=1"]
        )
    assert "federation.secagg_threshold" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="statistics_first"):
        load_config(overrides=[*BASE, *SECURE, "federation.statistics_first=false"])


def test_an_institution_whose_class_could_exceed_the_quantisation_range_refuses_in_one_line(
    tmp_path, monkeypatch
):
    """Quantisation clips silently; an institution with more rows than the range refuses round 0 before
    its ledger is charged (the range lowered to 50 rows here: each of the three holds about 88), so
    the round is discarded instead of building the head on clipped statistics."""
    monkeypatch.setattr(settings, "STATISTICS_CLIP", 50.0)
    cfg = config(*SECURE, "privacy.enabled=true", "privacy.epsilon=8", "privacy.accountant=rdp")
    bench, _ = server_workbench(cfg)
    grid = SecAggGrid(cfg, tmp_path)
    strategy = build_strategy(cfg, bench.built.fingerprint, len(NODES))
    assert secure_statistics(grid, strategy, as_record(adapter_state(bench.built.model)), cfg) is None
    assert P.UNMASK not in grid.stages
    for pid in range(len(NODES)):
        assert not ledger_file(tmp_path, pid).exists()  # nothing charged
        error = (tmp_path / "audit" / f"client-{pid}-errors.log").read_text()
        assert "could exceed round 0's quantisation range of 50 rows" in error
    with pytest.raises(ConfigError) as err:
        settings.check_statistics_rows(51)
    assert "\n" not in str(err.value) and "51 training rows" in str(err.value)
