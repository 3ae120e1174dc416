"""fedlora-simulate --compare: the floor (linear probe), federated DP, each alone, centralised DP and
not, in one table that the terminal and report.md share."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest
import torch
import torch.nn.functional as F

from fedlora.common.config import load_config
from fedlora.simulations.compare import SETTINGS, compare, markdown, table
from fedlora.simulations.probe import logistic_regression, score

PRESET = str(files("fedlora.configs.simulation") / "medmcqa.yaml")
TINY = [
    "model.source=tiny-bert",
    "data.max_length=16",
    "training.batch_size=8",
    "training.local_steps=1",
    "federation.rounds=1",
    "federation.min_clients=2",
    "simulation.num_clients=2",
]


def test_logistic_regression_reaches_the_optimum_of_its_objective() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 5, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(120, generator=g) > 0).long() + (x[:, 1] > 1).long()
    head = logistic_regression(x, y, 3, c=1.0)
    loss = F.cross_entropy(head(x.double()), y, reduction="sum") + head.weight.pow(2).sum() / 2
    grads = torch.autograd.grad(loss, list(head.parameters()))
    assert max(float(g.abs().max()) for g in grads) < 1e-4
    assert score(head, x, y)["accuracy"] > 0.8


def test_table_orders_the_settings_and_measures_each_against_the_probe() -> None:
    summary = {
        "linear_probe": {"accuracy": 0.5, "loss": 1.0, "rows": 100.0, "epsilon": None},
        "federated_dp": {"accuracy": 0.6, "loss": 0.9, "rows": 100.0, "epsilon": 7.9},
        "alone_dp": [{"accuracy": 0.3, "loss": 2.0, "rows": 50.0, "epsilon": 8.0}] * 2,
        "alone_dp_mean": {"accuracy": 0.3, "loss": 2.0, "rows": 50.0, "epsilon": 8.0},
        "centralised_dp": {"accuracy": 0.55, "loss": 1.1, "rows": 100.0, "epsilon": 8.0},
        "centralised": {"accuracy": 0.7, "loss": 0.8, "rows": 100.0, "epsilon": None},
    }
    rows = table(summary)
    assert [r[0] for r in rows] == [
        SETTINGS["linear_probe"],
        "federated (DP)",
        "client-1 alone (DP)",
        "client-2 alone (DP)",
        SETTINGS["alone_dp_mean"],
        "centralised (DP)",
        "centralised (no DP)",
    ]
    assert [r[3] for r in rows] == [f"{d:+.1f} pts" for d in (0, 10, -20, -20, -20, 5, 20)]
    assert rows[0][5] == "none" and rows[1][5] == "7.90"
    no_probe = table({k: v for k, v in summary.items() if k != "linear_probe"})
    assert all(r[3] == "-" for r in no_probe)
    assert all("| " + " | ".join(r) + " |" in markdown(summary) for r in rows)


def test_compare_on_the_medmcqa_preset_reports_every_setting(tmp_path) -> None:
    """A tiny model on the real preset's data: the probe and four trainings beside a federated result
    (the federation itself is test_simulation's)."""
    cfg = load_config(PRESET, overrides=TINY, persona="simulation")
    federated = {"accuracy": 0.25, "loss": 2.5, "rows": 7685.0, "epsilon": 1.0}
    summary = compare(cfg, tmp_path, federated)
    assert list(summary) == [
        "linear_probe",
        "federated_dp",
        "alone_dp",
        "alone_dp_mean",
        "centralised_dp",
        "centralised",
    ]
    assert json.loads((tmp_path / "compare" / "compare.json").read_text()) == summary
    assert summary["federated_dp"] == federated
    assert summary["linear_probe"]["rows"] == summary["centralised"]["rows"] == 7685
    assert summary["linear_probe"]["epsilon"] is None and summary["centralised"]["epsilon"] is None
    assert len(summary["alone_dp"]) == 2
    assert sum(m["rows"] for m in summary["alone_dp"]) == 7685
    assert summary["alone_dp_mean"]["accuracy"] == pytest.approx(
        sum(m["accuracy"] for m in summary["alone_dp"]) / 2
    )
    assert 0 < summary["centralised_dp"]["epsilon"] <= 8.0
    assert json.loads((tmp_path / "compare" / "ledger-centralised.json").read_text())
    for setting in ("linear_probe", "centralised_dp", "centralised"):
        assert 0 <= summary[setting]["accuracy"] <= 1
    assert (tmp_path / "compare" / "compare.png").stat().st_size > 0
