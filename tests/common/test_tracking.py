"""Experiment tracking (--track): a tiny simulation read back with MLflow's own client, the refusal
without the extra, and what a round logs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedlora.common.tracking import PARAM_LIMIT, STORE_FOLDER, flat, tracked
from fedlora.server.history import round_metrics
from fedlora.simulations import cli as sim_cli

SIMULATION = [
    "model.source=tiny-bert",
    "data.max_length=32",
    "data.train_rows=64",
    "data.eval_rows=64",
    "training.local_steps=2",
    "training.batch_size=8",
    "privacy.epsilon=100",
    "privacy.planned_rounds=2",
    "federation.rounds=2",
    "federation.min_clients=2",
    "federation.fraction_evaluate=0",
    "simulation.num_clients=2",
    "simulation.partition=iid",
]


def test_without_mlflow_track_is_refused_in_one_line_naming_the_extra(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    code = sim_cli.main(["--out", str(tmp_path / "run"), "--track", "--set", "model.source=tiny-bert"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "--track" in err and "fedlora[track]" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything started


def test_without_track_nothing_is_logged_nor_imported(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with tracked(None, tmp_path, "x") as tracker:
        tracker.params({"a": {"b": 1}})
        tracker.metrics({"accuracy": 0.5}, step=1)
        tracker.artifacts([tmp_path])
    assert not (tmp_path / STORE_FOLDER).exists()


def test_config_params_are_flattened_to_dotted_keys() -> None:
    assert flat({"privacy": {"epsilon": 8.0, "delta": 1e-5}, "name": "h", "x": {"y": {"z": [1]}}}) == {
        "privacy.epsilon": "8.0",
        "privacy.delta": "1e-05",
        "name": "h",
        "x.y.z": "[1]",
    }
    assert len(flat({"data": {"prompt": "x" * 10_000}})["data.prompt"]) == PARAM_LIMIT


def test_a_round_logs_scores_drops_and_each_institutions_epsilon() -> None:
    entry = {
        "round": 3,
        "clients": [{"node": 9, "epsilon": 1.5, "num-examples": 10}, {"node": 4, "epsilon": 2.0}],
        "dropped": [{"node": 7, "reason": "budget exhausted"}],
        "central": {"accuracy": 0.7, "macro_f1": 0.6, "loss": 0.9, "recall_0": 0.1, "examples": 50.0},
    }
    assert round_metrics(entry, {4: "client-1", 9: "client-2"}) == {
        "accuracy": 0.7,
        "macro_f1": 0.6,
        "loss": 0.9,
        "replies": 2.0,
        "dropped": 1.0,
        "epsilon/client-2": 1.5,
        "epsilon/client-1": 2.0,
    }


@pytest.mark.slow
@pytest.mark.integration
def test_a_tracked_simulation_reads_back_with_mlflow(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    sets = [a for s in SIMULATION for a in ("--set", s)]
    assert sim_cli.main(["--out", str(out), "--track", *sets]) == 0, capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in to its file store
    read_back(out, monkeypatch)


def read_back(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What MLflow's own client finds of a tracked run of SIMULATION in ``out``."""
    import mlflow

    uri = (out / STORE_FOLDER).as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == out.name
    params = run.data.params
    assert params["federation.rounds"] == "2" and params["model.source"] == "tiny-bert"
    assert params["privacy.epsilon"] == "100.0" and params["simulation.num_clients"] == "2"
    client = mlflow.MlflowClient(uri)
    history = {key: client.get_metric_history(run.info.run_id, key) for key in run.data.metrics}
    assert [m.step for m in history["accuracy"]] == [0, 1, 2]  # round 0 (statistics), 1, 2
    assert {"macro_f1", "loss", "dropped", "replies"} <= history.keys()
    assert [m.value for m in history["dropped"]] == [0, 0, 0]
    epsilons = sorted(k for k in history if k.startswith("epsilon/"))
    assert epsilons == ["epsilon/client-1", "epsilon/client-2"]
    spent = [m.value for m in history["epsilon/client-1"]]
    assert spent == sorted(spent) and 0 < spent[-1] <= 100
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "report.md", "accuracy_loss.png", "epsilon.png"} <= files
    adapter = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/README.md", "adapter/adapter_model.safetensors"} <= adapter
    assert not any(path.startswith(("canaries", "audit", "ledger")) for path in files)


INSTITUTION = """\
name: hospital-a
model: {source: tiny-bert}
data: {path: train.csv, max_length: 16}
training: {batch_size: 4, local_steps: 2, device: cpu}
privacy: {epsilon: 8.0, accountant: rdp, planned_rounds: 2, ledger_path: ledger.json}
"""


@pytest.mark.slow
def test_a_tracked_train_local_logs_each_round_and_its_adapter(tmp_path, monkeypatch, capsys) -> None:
    mlflow = pytest.importorskip("mlflow")
    from fedlora.client import cli as client_cli

    rows = [("chest pain", "cardio"), ("dry cough", "resp"), ("itchy rash", "derm")] * 4
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    (tmp_path / "hospital-a.yaml").write_text(INSTITUTION)
    out = tmp_path / "local"
    code = client_cli.main(["train-local", str(tmp_path / "hospital-a.yaml"), "--out", str(out), "--track"])
    assert code == 0, capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient((out / STORE_FOLDER).as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("hospital-a").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["privacy.epsilon"] == "8.0"
    spent = client.get_metric_history(run.info.run_id, "epsilon")
    assert [m.step for m in spent] == [1, 2] and 0 < spent[0].value < spent[1].value <= 8.0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert files == {"adapter", "metrics.json"}


def test_server_start_refuses_track_without_mlflow_first(tmp_path, monkeypatch, capsys) -> None:
    from fedlora.server import cli as server_cli

    monkeypatch.setitem(sys.modules, "mlflow", None)
    config = tmp_path / "coordinator.yaml"
    config.write_text("name: coordinator\nmodel: {source: tiny-bert}\n")
    assert server_cli.main(["start", str(config), "--insecure", "--track"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --track: MLflow is not installed") and "fedlora[track]" in err
    assert not (tmp_path / "run").exists()  # no run folder, no SuperLink


def test_a_store_that_cannot_be_written_is_one_line(tmp_path) -> None:
    pytest.importorskip("mlflow")
    from fedlora.common.errors import ConfigError

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    refused = pytest.raises(ConfigError, match=r"^--track: .*a-file/mlruns: cannot start an MLflow run")
    with refused as err, tracked((blocked / "mlruns").as_uri(), tmp_path, "x"):
        pass
    assert "\n" not in str(err.value)
