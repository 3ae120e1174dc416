"""``fedlora-client`` as an institution runs it: the real console script in a fresh process.

Each process pays the imports (~6 s of CPU), so all of them start once, a few at a time, in a
module fixture; each test waits for its own.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROWS = [
    ("Chest pain after climbing stairs", "cardio"),
    ("Persistent dry cough for two weeks", "resp"),
    ("Rash on both arms", "derm"),
    ("Shortness of breath at night", "cardio"),
    ("Itchy red patches on the neck", "derm"),
    ("Coughing up phlegm every morning", "resp"),
    ("Palpitations and dizziness", "cardio"),
    ("Wheezing when running", "resp"),
    ("Dry flaky skin on the hands", "derm"),
    ("Swollen ankles in the evening", "cardio"),
    ("Blocked nose and sneezing", "resp"),
    ("Blisters after sun exposure", "derm"),
]
BATCH, STEPS, ROUNDS, EPSILON = 4, 2, 2, 8.0
WRONG_TYPED_LEDGER = {
    "accountant": "rdp",
    "delta": 1e-5,
    "noise_multiplier": 1.0,
    "entries": [
        {"round": 1, "noise_multiplier": 1.0, "sample_rate": 0.3, "steps": "x", "epsilon": 1.0, "time": 0}
    ],
}

CONFIG = f"""\
name: hospital-a
model:
  source: tiny-bert
data:
  path: train.csv
  max_length: 16
training:
  batch_size: {BATCH}
  local_steps: {STEPS}
  device: cpu
privacy:
  epsilon: {EPSILON}
  accountant: rdp
  planned_rounds: {ROUNDS}
  ledger_path: ledger.json
"""


def write_csv(path: Path, rows) -> Path:
    lines = ["text,label", *(f'"{text}",{label}' for text, label in rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def site(root: Path, name: str, config: str, csv_rows=ROWS) -> Path:
    """A folder with a config and its data; returns the config path."""
    folder = root / name
    folder.mkdir()
    write_csv(folder / "train.csv", csv_rows)
    path = folder / "hospital-a.yaml"
    path.write_text(config)
    return path


def run_client(args: list[str], cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "200",  # rich wraps tables at 80 columns without a terminal
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "fedlora.client.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# name -> (config text, extra files in its folder, what the one error line must name)
BAD_INPUTS = {
    "malformed-yaml": (
        CONFIG.replace("source: tiny-bert", "source: [tiny-bert"),
        {},
        ["hospital-a.yaml", "malformed YAML"],
    ),
    "unknown-key": (CONFIG.replace("epsilon: ", "epsilom: "), {}, ["hospital-a.yaml", "privacy.epsilom"]),
    "missing-column": (
        CONFIG.replace("max_length: 16", "max_length: 16\n  text_column: note"),
        {},
        ["train.csv", "'note'"],
    ),
    "empty-data": (
        CONFIG.replace("path: train.csv", "path: empty.csv"),
        {"empty.csv": ""},
        ["empty.csv", "no rows"],
    ),
    "label-not-in-set": (
        CONFIG.replace("max_length: 16", "max_length: 16\n  labels: [cardio, derm]"),
        {},
        ["train.csv", "'resp'", "not in the label set"],
    ),
    "missing-model": (
        CONFIG.replace("source: tiny-bert", "source: /nonexistent"),
        {},
        ["model.source", "/nonexistent"],
    ),
    "delta-not-below-1/rows": (
        CONFIG.replace("accountant: rdp", "accountant: rdp\n  delta: 0.5"),
        {},
        ["privacy.delta", "0.5", f"1/{len(ROWS)}"],
    ),
    "epsilon-below-any-noise": (
        CONFIG.replace(f"epsilon: {EPSILON}", "epsilon: 0.01"),
        {},
        ["privacy.epsilon", "0.01", "at least about 0.103"],
    ),
    "ledger-wrong-types": (
        CONFIG,
        {"ledger.json": json.dumps(WRONG_TYPED_LEDGER)},
        ["ledger.json", "'steps'", "'x'"],
    ),
}
TRAIN_LOCAL_REFUSALS = {  # name -> (extra arguments, what the one error line must name)
    "out-is-a-file": (["--out", "{root}/a-file"], ["--out", "a-file", "not a folder"]),
    "rounds-negative": (["--rounds", "-1"], ["--rounds", "-1"]),
    "rounds-zero": (["--rounds", "0"], ["--rounds", "0"]),
    "delta-not-below-1/rows": (["--set", "privacy.delta=0.1"], ["privacy.delta", "0.1", f"1/{len(ROWS)}"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[dict[str, tuple[Path, Future]]]:
    root = tmp_path_factory.mktemp("client-cli")
    cwd = root / "elsewhere"  # relative paths must resolve against the config, not the cwd
    cwd.mkdir()
    jobs: dict[str, tuple[Path, list[str]]] = {}
    good = site(root, "good", CONFIG)
    jobs["check"] = (good, ["check", str(good)])
    out = root / "out"
    train = site(root, "train", CONFIG)
    jobs["train-local"] = (out, ["train-local", str(train), "--out", str(out), "--rounds", str(ROUNDS)])
    # Planned for ROUNDS, asked for two more: the budget stops the run after round ROUNDS.
    midrun = site(root, "midrun", CONFIG)
    jobs["stops-mid-run"] = (midrun, ["train-local", str(midrun), "--out", str(root / "midrun-out")])
    jobs["stops-mid-run"][1].extend(["--rounds", str(ROUNDS + 2)])
    diverges = site(root, "diverges", CONFIG)
    jobs["non-finite"] = (
        diverges,
        [
            "train-local",
            str(diverges),
            "--out",
            str(root / "diverges-out"),
            "--set",
            "training.learning_rate=1.0e+30",
        ],
    )
    huge = site(root, "huge-plan", CONFIG)
    jobs["huge-plan"] = (huge, ["check", str(huge), "--set", "privacy.planned_rounds=100000"])
    (root / "a-file").write_text("not a folder")
    for name, (extra, _) in TRAIN_LOCAL_REFUSALS.items():
        path = site(root, f"refuse-{name.replace('/', '-')}", CONFIG)
        extra = [a.format(root=root) for a in extra]
        out = [] if "--out" in extra else ["--out", str(path.parent / "out")]
        jobs[f"refuse-{name}"] = (path, ["train-local", str(path), *out, *extra])
    for name, (config, files, _) in BAD_INPUTS.items():
        path = site(root, name.replace("/", "-"), config)
        for file, text in files.items():
            (path.parent / file).write_text(text)
        jobs[name] = (path, ["check", str(path)])
    pool = ThreadPoolExecutor(max_workers=3)
    # The long runs are submitted first, so the short failures fill the gaps. A check of a huge plan
    # composes once per reported point, not per round: seconds, not hours.
    futures = {
        name: (where, pool.submit(run_client, args, cwd, 150 if name == "huge-plan" else 400))
        for name, (where, args) in jobs.items()
    }
    yield futures
    pool.shutdown(wait=True)


def result(runs, name) -> tuple[Path, subprocess.CompletedProcess]:
    where, future = runs[name]
    return where, future.result()


def field(output: str, name: str) -> str:
    """The value cell of the table row whose first cell is ``name``."""
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if len(cells) == 2 and cells[0] == name:
            return cells[1]
    raise AssertionError(f"no row {name!r} in:\n{output}")


def test_check_prints_the_plan(runs):
    config, done = result(runs, "check")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output
    assert field(output, "training rows") == str(len(ROWS))
    counts = Counter(label for _, label in ROWS)
    expected_labels = ", ".join(f"{label} ({counts[label]})" for label in sorted(counts))
    assert field(output, "labels") == expected_labels
    # Planned values print as "value: reason"; these two the config sets.
    noise = float(field(output, "noise multiplier").split(":")[0])
    assert noise > 0
    assert float(field(output, "sample rate").split(":")[0]) == pytest.approx(BATCH / len(ROWS), abs=1e-4)
    after = [float(x.split(":")[1]) for x in field(output, "epsilon per row after round").split(",")]
    assert len(after) == ROUNDS and after == sorted(after) and after[0] > 0
    # Independent: Opacus' RDP accountant on the printed noise gives the printed epsilons, after the
    # round-0 statistics release at a quarter of the budget (one step at sample rate 1).
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import get_noise_multiplier

    release = get_noise_multiplier(
        target_epsilon=EPSILON / 4, target_delta=1e-5, sample_rate=1.0, steps=1, accountant="rdp"
    )
    assert field(output, "statistics noise").startswith(f"{release:.4g}: 25% of epsilon")
    for k, printed in enumerate(after, start=1):
        accountant = create_accountant("rdp")
        accountant.history = [(release, 1.0, 1), (noise, BATCH / len(ROWS), STEPS * k)]
        assert accountant.get_epsilon(delta=1e-5) == pytest.approx(printed, abs=0.011)
    # Calibrated to spend the budget over the planned rounds: they fit, with little to spare.
    assert 0.9 * EPSILON <= after[-1] <= EPSILON
    assert int(field(output, "rounds affordable")) == ROUNDS
    assert "epsilon 0.000 of 8" in field(output, "spent so far")
    # A check spends nothing and writes no ledger.
    assert not (config.parent / "ledger.json").exists()


def test_train_local_writes_adapter_metrics_and_ledger(runs):
    out, done = result(runs, "train-local")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(math.isfinite(r["loss"]) for r in rounds)
    epsilons = [r["epsilon"] for r in rounds]
    assert all(e > 0 for e in epsilons) and epsilons == sorted(epsilons)
    # No federation, no round-0 statistics release: the planned rounds spend the whole budget.
    assert epsilons[-1] == pytest.approx(EPSILON, rel=0.01)
    # The institution's one ledger (privacy.ledger_path), not a fresh one per output folder.
    assert not (out / "privacy-ledger.json").exists()
    ledger = json.loads((out.parent / "train" / "ledger.json").read_text())
    assert [e["round"] for e in ledger["entries"]] == list(range(1, ROUNDS + 1))
    assert [e["steps"] for e in ledger["entries"]] == [STEPS] * ROUNDS
    assert ledger["entries"][-1]["epsilon"] == pytest.approx(epsilons[-1])
    assert ledger["noise_multiplier"] == pytest.approx(metrics["noise_multiplier"])
    assert metrics["sample_rate"] == pytest.approx(BATCH / len(ROWS))
    # The same config gives the same fingerprint in another process (the check run).
    _, check = result(runs, "check")
    meta = json.loads((adapter / "fedlora.json").read_text())
    assert meta["fingerprint"] == field(check.stdout + check.stderr, "fingerprint")
    assert meta["labels"] == sorted({label for _, label in ROWS})


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(runs, case):
    _, done = result(runs, case)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert len(lines) == 1, done.stderr
    assert done.stdout.strip() == ""
    for culprit in BAD_INPUTS[case][2]:
        assert culprit in lines[0], lines[0]


def one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip() and "train-local" not in line]
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("case", sorted(TRAIN_LOCAL_REFUSALS))
def test_train_local_refuses_before_spending(runs, case):
    config, done = result(runs, f"refuse-{case}")
    line = one_error_line(done)
    for culprit in TRAIN_LOCAL_REFUSALS[case][1]:
        assert culprit in line, line
    assert not (config.parent / "ledger.json").exists()  # nothing spent
    assert not (config.parent / "out" / "adapter").exists()


def test_train_local_out_of_budget_keeps_the_rounds_it_spent(runs):
    config, done = result(runs, "stops-mid-run")
    line = one_error_line(done)
    assert f"stopped before round {ROUNDS + 1} of {ROUNDS + 2}" in line, line
    assert f"adapter of round {ROUNDS}" in line and "affords: 0" in line, line
    out = config.parent.parent / "midrun-out"
    ledger = json.loads((config.parent / "ledger.json").read_text())
    assert [e["round"] for e in ledger["entries"]] == list(range(1, ROUNDS + 1))
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, ROUNDS + 1))
    assert metrics["rounds"][-1]["epsilon"] == pytest.approx(ledger["entries"][-1]["epsilon"])
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "metrics.json"]  # no partial export


def test_train_local_never_exports_a_non_finite_adapter(runs):
    config, done = result(runs, "non-finite")
    line = one_error_line(done)
    assert "round 1 trained a non-finite adapter" in line and "not exported" in line, line
    assert "training.learning_rate" in line and "nothing was exported" in line, line
    out = config.parent.parent / "diverges-out"
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    # The round ran, so its cost stays on the ledger: spend is never forgotten.
    assert [e["round"] for e in json.loads((config.parent / "ledger.json").read_text())["entries"]] == [1]


def test_check_of_a_huge_plan_reports_a_few_points(runs):
    config, done = result(runs, "huge-plan")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    points = [x.split(":") for x in field(output, "epsilon per row after round").split(",")]
    rounds = [int(k) for k, _ in points]
    assert len(rounds) <= 11 and rounds == sorted(rounds) and rounds[-1] == 100000
    assert 0.9 * EPSILON <= float(points[-1][1]) <= EPSILON
    assert 100000 <= int(field(output, "rounds affordable")) <= 101000  # calibrated to spend it all
    assert not (config.parent / "ledger.json").exists()
