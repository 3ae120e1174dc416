"""The aggregator comparison: every setting is a valid config, and the summary reads the history."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from flwr.app import ArrayRecord
from scipy import stats

from benchmarks.aggregators import (
    cells,
    combine,
    difference,
    main,
    settings,
    summarise,
)
from benchmarks.bare_flower import initial_adapter, load_and_send
from benchmarks.overhead import lora_spec
from fedlora.client.app import with_rank
from fedlora.common.adapter import adapter_state
from fedlora.common.cli_support import read_config
from fedlora.common.model import lora_scale
from fedlora.common.workbench import prepare
from fedlora.simulations.cli import default_config


def test_every_setting_is_a_valid_config_that_differs_where_it_should():
    chosen = settings(dp=True, ranks=[4, 8, 16, 8, 4], dp_off=True, global_rank=8, alpha=16.0)
    names = [s.name for s in chosen]
    assert names == [
        "fedavg dp", "exact dp", "ffa dp", "fedavg no-dp", "exact no-dp", "ffa no-dp", "exact+ef dp",
        "exact ranks 4/8/16 dp", "exact ranks 4/8/16 global 16 dp", "exact ranks 4/8/16 global 16 rslora dp",
    ]  # fmt: skip
    configs = {s.name: read_config(default_config(), s.overrides) for s in chosen}
    assert configs["ffa dp"].model.variant == "ffa" and configs["ffa dp"].federation.aggregator == "ffa"
    assert not configs["exact no-dp"].privacy.enabled and configs["exact dp"].privacy.enabled
    assert configs["exact ranks 4/8/16 dp"].simulation.client_ranks == (4, 8, 16, 8, 4)
    assert configs["exact ranks 4/8/16 dp"].model.lora_r == 8
    wide = configs["exact ranks 4/8/16 global 16 dp"]
    assert wide.model.lora_r == 16 and wide.simulation.client_ranks == (4, 8, 16, 8, 4)
    rs = configs["exact ranks 4/8/16 global 16 rslora dp"]
    assert rs.model.use_rslora and rs.model.lora_r == 16 and rs.simulation.client_ranks == (4, 8, 16, 8, 4)
    # A rank-8 client keeps the uniform federation's scale; rank 4 and 16 move as far under Adam.
    assert lora_scale(with_rank(rs, 8).model) == pytest.approx(lora_scale(configs["exact dp"].model))
    assert lora_scale(with_rank(rs, 4).model) * 2 == pytest.approx(lora_scale(with_rank(rs, 16).model) * 4)
    assert not {"exact ranks 4/8/16 global 16 dp", "exact ranks 4/8/16 global 16 rslora dp"} & {
        s.name for s in settings(dp=True, ranks=[4, 8, 16, 8, 4], dp_off=False, global_rank=16, alpha=16.0)
    }
    ef = configs["exact+ef dp"].federation
    assert ef.error_feedback and ef.aggregator == "exact" and configs["exact+ef dp"].privacy.enabled
    assert not configs["exact dp"].federation.error_feedback
    assert [s.name for s in settings(dp=False, ranks=[], dp_off=False, global_rank=8, alpha=16.0)] == [
        "fedavg no-dp", "exact no-dp", "ffa no-dp", "exact+ef no-dp"
    ]  # fmt: skip


def test_only_an_unknown_setting_is_refused_naming_the_settings(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--only", "exact dp", "exakt dp"]) == 2
    err = capsys.readouterr().err
    assert "--only: no setting 'exakt dp'" in err and "exact ranks 4/8/16 dp" in err
    assert list(tmp_path.iterdir()) == []  # refused before any run


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--baseline", "exakt dp"], "--baseline: no setting 'exakt dp'"),
        (
            ["--only", "exact dp", "--baseline", "fedavg dp"],
            "'fedavg dp' is not among the settings --only chose",
        ),
    ],
)
def test_a_baseline_that_is_not_run_is_refused(tmp_path, capsys, argv, message):
    assert main(["--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_summary_of_a_history():
    history = [
        {"round": 0, "central": {"accuracy": 0.5}},
        {
            "round": 1,
            "central": {"accuracy": 0.7, "loss": 0.5},
            "clients": [{"bytes": 100, "epsilon": 2.0}, {"bytes": 300, "epsilon": 3.0}],
            "aggregation": {"aggregation_seconds": 0.004},
        },
        {
            "round": 2,
            "central": {"accuracy": 0.6, "loss": 0.4},
            "clients": [{"bytes": 200, "epsilon": 4.0}],
            "aggregation": {"aggregation_seconds": 0.002},
        },
    ]
    s = summarise(history)
    assert s["accuracy"] == [0.5, 0.7, 0.6]
    assert (s["final_accuracy"], s["best_accuracy"]) == (0.6, 0.7)
    assert s["late_accuracy"] == 0.6  # rounds after the first half: round 2 of 0..2
    assert s["final_loss"] == 0.4
    assert s["bytes_per_client_round"] == 200
    assert s["aggregation_ms_per_round"] == pytest.approx(3.0)
    assert s["max_epsilon"] == 4.0


def test_repeats_combine_into_mean_spread_and_every_run():
    def run(acc: list[float], ms: float) -> dict:
        return {
            "accuracy": acc,
            "final_accuracy": acc[-1],
            "best_accuracy": max(acc),
            "late_accuracy": acc[-1],
            "final_loss": 1 - acc[-1],
            "bytes_per_client_round": 100.0,
            "aggregation_ms_per_round": ms,
            "max_epsilon": 7.5 + ms,
        }

    runs = [run([0.5, 0.7, 0.8], 1.0), run([0.5, 0.9, 0.6], 3.0)]
    c = combine("exact dp", runs)
    assert c["accuracy"] == pytest.approx([0.5, 0.8, 0.7])
    assert c["final_accuracy"] == pytest.approx(0.7)
    assert c["final_sd"] == pytest.approx(0.1414, abs=1e-4)
    assert c["best_accuracy"] == pytest.approx(0.85)
    assert c["late_accuracy"] == pytest.approx(0.7)
    assert c["final_loss"] == pytest.approx(0.3)
    assert c["aggregation_ms_per_round"] == pytest.approx(2.0)
    assert c["max_epsilon"] == 10.5 and c["runs"] == runs
    assert combine("one", runs[:1])["final_sd"] == 0.0


def _runs(name: str, finals: list[float]) -> dict:
    return {"setting": name, "runs": [{"final_accuracy": a, "final_loss": 1 - a} for a in finals]}


def test_difference_is_welchs_interval_computed_by_hand():
    base, other = [0.781, 0.793, 0.787, 0.787, 0.787], [0.769, 0.775, 0.775]
    gap, low, high = difference(_runs("base", base), _runs("other", other), "final_accuracy")
    va, vb = statistics.variance(other) / 3, statistics.variance(base) / 5
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 4)  # Welch-Satterthwaite
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    expected = statistics.mean(other) - statistics.mean(base)
    assert gap == pytest.approx(expected) and expected < 0
    assert (low, high) == pytest.approx((expected - half, expected + half))
    assert high < 0  # this gap is outside the noise


def test_difference_without_spread_has_no_interval_and_the_row_says_so():
    base, lone = _runs("base", [0.78, 0.79]), _runs("lone", [0.80])
    gap, low, high = difference(base, lone, "final_accuracy")
    assert gap == pytest.approx(0.015) and math.isnan(low) and math.isnan(high)
    assert math.isnan(difference(_runs("a", [0.7, 0.7]), _runs("b", [0.8, 0.8]), "final_loss")[1])
    run = {
        "accuracy": [0.7, 0.8],
        "final_accuracy": 0.8,
        "best_accuracy": 0.8,
        "late_accuracy": 0.8,
        "final_loss": 0.2,
        "bytes_per_client_round": 1024.0,
        "aggregation_ms_per_round": 1.0,
        "max_epsilon": 8.0,
    }
    row = combine("lone", [run])
    assert cells(row, base)[4] == "+0.0150" and cells(row, base)[8] == "-0.0150"
    assert cells(row, row)[4] == "baseline"


def test_the_lora_baseline_sends_back_what_it_loaded_in_fedloras_shapes():
    """The overhead baseline is only fair if it really loads the global adapter (keys that did not
    match would be ignored silently) and exchanges the same tensors as fedlora."""
    cfg = read_config(default_config(), [])
    work = prepare(cfg)
    spec = lora_spec(cfg, work)
    start = initial_adapter(spec).to_torch_state_dict()
    ours = adapter_state(work.built.model)
    assert sorted(v.shape for v in start.values()) == sorted(v.shape for v in ours.values())
    g = torch.Generator().manual_seed(0)
    sent = {k: torch.randn(v.shape, generator=g) for k, v in start.items()}
    back = load_and_send(spec, ArrayRecord(sent)).to_torch_state_dict()
    assert back.keys() == sent.keys()
    assert all(torch.equal(back[k], sent[k]) for k in sent)


def test_memory_benchmark_ratio_is_last_round_over_round_2_and_too_few_rounds_are_refused(capsys):
    from benchmarks import memory

    figures = {1: {"actor 7": 900.0}, 2: {"actor 7": 1000.0}, 3: {"actor 7": 1040.0, "actor 8": 5.0}}
    assert memory.growth(figures) == {"actor 7": pytest.approx(1.04)}
    assert memory.main(["--rounds", "2", "--model", "tiny-bert"]) == 2
    assert "--rounds: 2; at least 3" in capsys.readouterr().err


def test_scale_benchmark_counts_updates_after_round_1_and_the_whole_run_with_the_start():
    from benchmarks.scale import Run

    run = Run(ends=(30.0, 32.0, 36.0), updates=(20, 20, 20), training=(9.0, 1.0, 3.0), actors=2, peak_mb=9.0)
    assert run.per_minute == pytest.approx(60 * 40 / 6)  # rounds 2 and 3 over the 6 s after round 1
    assert run.fixed_cost == pytest.approx((2 * 6 - 4.0) / 40)  # 2 actors busy 6 s, 4 s of DP steps
    assert run.whole_run == pytest.approx(36.0 / 60)
    one = Run(ends=(30.0,), updates=(20,), training=(0.0,), actors=2, peak_mb=1.0)
    assert math.isnan(one.per_minute) and math.isnan(one.fixed_cost)


def test_scale_benchmark_memory_is_the_whole_process_tree():
    """Ray's workers are descendants of the benchmark: a child holding 200 MB must show in the total."""
    import subprocess
    import sys

    from benchmarks.scale import tree_rss

    alone = tree_rss()
    code = "import sys; b = b'x' * (200 * 2**20); print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        assert tree_rss() - alone > 150
    finally:
        child.stdin.close()
        child.wait(timeout=30)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "1"], "--rounds: 1; at least 2 (round 1 pays the start and is not counted)"),
        (["--institutions", "0", "10"], "--institutions: 0; each count at least 1"),
        (["--sampled", "0"], "--sampled: 0; at least 1"),
    ],
)
def test_scale_benchmark_refuses_too_few_rounds_or_institutions_in_one_line(capsys, argv, message):
    from benchmarks import scale

    assert scale.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}"
