"""The paired benchmark over seeds: settings, what it reads from compare(), and its rows."""

from __future__ import annotations

import math

import pytest

from benchmarks.seeds import Setting, main, parse_setting, scores, summarise
from fedlora.common.errors import ConfigError


def test_a_setting_is_a_name_an_optional_config_and_overrides():
    assert parse_setting(["exact", "federation.aggregator=exact"]) == Setting(
        "exact", None, ("federation.aggregator=exact",)
    )
    assert parse_setting(["mine", "my.yaml", "a.b=1"]) == Setting("mine", "my.yaml", ("a.b=1",))
    with pytest.raises(ConfigError, match="one config file at most"):
        parse_setting(["two", "a.yaml", "b.yaml"])
    with pytest.raises(ConfigError, match="starts with a name"):
        parse_setting(["a.b=1"])


def test_every_result_compare_returns_is_read_whatever_its_key():
    summary = {
        "federated_dp": {"accuracy": 0.8, "loss": 0.5, "rows": 10.0},
        "alone_dp": [{"accuracy": 0.5, "loss": 1.0}, {"accuracy": 0.7, "loss": 0.8}],
        "linear_probe": {"accuracy": 0.75},
        "notes": {"rows": 3.0},
        "labels": ["a", "b"],
    }
    assert scores(summary, "accuracy") == {
        "federated_dp": 0.8,
        "alone_dp (mean)": pytest.approx(0.6),
        "linear_probe": 0.75,
    }
    assert scores(summary, "loss") == {"federated_dp": 0.5, "alone_dp (mean)": pytest.approx(0.9)}


def test_rows_pair_each_setting_with_the_first_seed_by_seed():
    runs = {
        "base": [
            {"federated": 0.70, "seconds": 1.0},
            {"federated": 0.72, "seconds": 1.0},
            {"federated": 0.74},
        ],
        "new": [{"federated": 0.71}, {"federated": 0.75}, {"federated": 0.76}],
        "cut short": [{"federated": 0.60}],
    }
    rows = {row["setting"]: row for row in summarise(runs)}
    assert set(rows["base"]) == {"setting", "result", "values", "mean"}  # the baseline has no difference
    assert rows["new"]["mean"].mean == pytest.approx(0.74)
    assert rows["new"]["difference"].mean == pytest.approx(0.02)
    assert rows["new"]["difference"].half_width == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    short = rows["cut short"]["difference"]
    assert short.mean == pytest.approx(-0.10) and short.n == 1 and math.isnan(short.low)


def test_bad_settings_are_refused_in_one_line(capsys):
    assert main(["--setting", "a", "x=1", "--setting", "a", "y=2"]) == 2
    assert "two settings named 'a'" in capsys.readouterr().err
    assert main(["--seeds", "0"]) == 2
    assert "--seeds: must be >= 1, got 0" in capsys.readouterr().err
