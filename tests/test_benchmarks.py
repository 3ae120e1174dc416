"""The aggregator comparison: every setting is a valid config, and the summary reads the history."""

from __future__ import annotations

import pytest

from fedlora.common.cli_support import read_config
from fedlora.simulations.benchmarks.aggregators import settings, summarise
from fedlora.simulations.cli import default_config


def test_every_setting_is_a_valid_config_that_differs_where_it_should():
    chosen = settings(dp=True, ranks=[4, 8, 16, 8, 4], dp_off=True)
    names = [s.name for s in chosen]
    assert names == [
        "fedavg dp", "exact dp", "ffa dp", "fedavg no-dp", "exact no-dp", "ffa no-dp", "exact ranks 4/8/16 dp"
    ]  # fmt: skip
    configs = {s.name: read_config(default_config(), s.overrides) for s in chosen}
    assert configs["ffa dp"].model.variant == "ffa" and configs["ffa dp"].federation.aggregator == "ffa"
    assert not configs["exact no-dp"].privacy.enabled and configs["exact dp"].privacy.enabled
    assert configs["exact ranks 4/8/16 dp"].simulation.client_ranks == (4, 8, 16, 8, 4)
    assert [s.name for s in settings(dp=False, ranks=[], dp_off=False)] == [
        "fedavg no-dp", "exact no-dp", "ffa no-dp"
    ]  # fmt: skip


def test_summary_of_a_history():
    history = [
        {"round": 0, "central": {"accuracy": 0.5}},
        {
            "round": 1,
            "central": {"accuracy": 0.7},
            "clients": [{"bytes": 100, "epsilon": 2.0}, {"bytes": 300, "epsilon": 3.0}],
            "aggregation": {"aggregation_seconds": 0.004},
        },
        {
            "round": 2,
            "central": {"accuracy": 0.6},
            "clients": [{"bytes": 200, "epsilon": 4.0}],
            "aggregation": {"aggregation_seconds": 0.002},
        },
    ]
    s = summarise(history)
    assert s["accuracy"] == [0.5, 0.7, 0.6]
    assert (s["final_accuracy"], s["best_accuracy"]) == (0.6, 0.7)
    assert s["bytes_per_client_round"] == 200
    assert s["aggregation_ms_per_round"] == pytest.approx(3.0)
    assert s["max_epsilon"] == 4.0
