"""The adapter's model card, written from the run's own records: a real (tiny) simulation, a real
train-local, and hand-made records of a deployment (no ledgers at the coordinator)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedlora.client import cli
from fedlora.client.ledger import PrivacyLedger
from fedlora.client.predict import load_trained
from fedlora.common.config import load_config, to_dict
from fedlora.common.errors import CheckpointError
from fedlora.common.model_card import write_model_card
from fedlora.simulations.run import simulate

PLACEHOLDERS = ("More Information Needed", "None", "nan", "TODO", "{", "[More")
SIMULATION = [
    "model.source=tiny-bert",
    "data.path={root}/train.csv",
    "data.eval_path={root}/held-out.csv",
    "data.max_length=32",
    "training.local_steps=2",
    "training.batch_size=8",
    "privacy.epsilon=50",
    "privacy.max_grad_norm=1.0",  # the card states it; left unset, the recipe plans it
    "federation.rounds=1",
    "federation.min_clients=2",
    "federation.fraction_evaluate=0",
    "simulation.num_clients=2",
    "simulation.partition=iid",
]


def no_placeholder(card: str) -> None:
    for text in PLACEHOLDERS:
        assert text not in card, f"placeholder {text!r} in the card"


def simulation_config(root: Path):
    return load_config(overrides=[o.format(root=root) for o in SIMULATION])


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    """Two virtual hospitals, one DP round on a few rows (small data: Ray's start is most of the time)."""
    run_dir = tmp_path_factory.mktemp("sim")
    for name, n in (("train.csv", 48), ("held-out.csv", 12)):
        rows = [f"note {i} dry cough,resp\nnote {i} red rash,derm" for i in range(n // 2)]
        (run_dir / name).write_text("\n".join(["text,label", *rows]) + "\n")
    simulate(simulation_config(run_dir), run_dir)
    return run_dir


def test_card_of_a_simulated_run_states_each_institutions_ledger_epsilon(simulated):
    card = (simulated / "adapter" / "README.md").read_text()
    cfg = simulation_config(simulated)
    ledgers = sorted((simulated / "ledgers").glob("*.json"))
    assert len(ledgers) == 2
    for path in ledgers:
        p = cfg.privacy
        spent = PrivacyLedger(path, p.epsilon, p.delta, p.accountant).spent
        assert spent > 0
        assert f"| {path.stem} | {spent:.4f} | {p.delta:g} |" in card
    no_placeholder(card)
    meta = json.loads((simulated / "adapter" / "fedlora.json").read_text())
    for fact in (
        "tiny-bert",
        meta["fingerprint"],
        *meta["labels"],
        "rounds: 1",
        "institutions: 2",
        "fedavg (LoRA aggregator)",
        "clipping norm: 1",
        "Opacus PRV",
        "privacy unit: one row",
        "LoRA rank 8",
        "training statistics in the clear: none",
        "- mechanism: DP-SGD with Opacus",
    ):
        assert fact in card
    assert "| accuracy |" in card  # the central evaluation, before and after
    assert "head round" not in card  # its institutions trained LoRA (examples_per_round uncapped)


def test_a_run_folders_adapter_names_its_base_and_predicts(simulated):
    config = json.loads((simulated / "adapter" / "adapter_config.json").read_text())
    meta = json.loads((simulated / "adapter" / "fedlora.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-bert"
    assert meta["base_model"] == {"name_or_path": "tiny-bert", "fingerprint": meta["fingerprint"]}
    trained = load_trained(simulated)  # the run folder itself
    assert trained.labels == tuple(meta["labels"])


def test_train_local_writes_a_card_with_its_ledgers_epsilon(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [
        "text,label",
        *[f"note {i} about {'cough' if i % 2 else 'rash'},{'resp' if i % 2 else 'derm'}" for i in range(20)],
    ]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "site.yaml").write_text(
        "name: hospital-a\nmodel:\n  source: tiny-bert\ndata:\n  path: train.csv\n  max_length: 16\n"
        "training:\n  batch_size: 4\n  local_steps: 2\n  device: cpu\n"
        "privacy:\n  epsilon: 8\n  accountant: rdp\n  planned_rounds: 1\n  ledger_path: ledger.json\n"
    )
    assert cli.main(["train-local", "site.yaml", "--out", "out"]) == 0
    card = (tmp_path / "out" / "adapter" / "README.md").read_text()
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert f"| hospital-a | {ledger['entries'][-1]['epsilon']:.4f} | 1e-05 |" in card
    assert "Opacus RDP" in card and "one institution alone" in card and "institutions: 1" in card
    no_placeholder(card)


def deployment_run(root: Path, history: list[dict]) -> Path:
    """What a coordinator's run folder holds: its own config, no institution's ledger."""
    cfg = load_config(overrides=["model.source=tiny-bert", "data.labels=[a,b]"])
    adapter = root / "adapter"
    adapter.mkdir(parents=True)
    meta = {"fingerprint": "0123456789abcdef", "labels": ["a", "b"], "config": to_dict(cfg)}
    (adapter / "fedlora.json").write_text(json.dumps(meta))
    peft = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}
    (adapter / "adapter_config.json").write_text(json.dumps(peft))
    (root / "history.json").write_text(json.dumps(history))
    return root


def client(node: int, epsilon: float, **extra: float) -> dict:
    return {"node": node, "epsilon": epsilon, "num-examples": 10.0, "steps": 2.0, **extra}


def test_deployment_card_states_what_each_node_reported_and_metrics_in_the_clear(tmp_path):
    history = [
        {"round": 0, "central": {"loss": 1.2, "accuracy": 0.5}},
        {"round": 1, "clients": [client(11, 0.7), client(22, 0.9, loss=0.8)], "central": {"loss": 1.05}},
        {"round": 2, "clients": [client(11, 1.4)], "dropped": [{"node": 33, "reason": "x"}], "central": {}},
    ]
    card = write_model_card(deployment_run(tmp_path, history)).read_text()
    assert "| node 11 | 1.4000 | its own |" in card and "| node 22 | 0.9000 | its own |" in card
    assert "institutions: 3" in card and "rounds: 2" in card
    assert "training loss (privacy.release_metrics)" in card
    assert "| loss | 1.2000 | 1.0500 |" in card
    assert "LoRA rank 4, alpha 8 (scale 2)" in card
    assert "head round" not in card
    no_placeholder(card)


def head_reply(node: int, epsilon: float, noise_std: float) -> dict:
    """A head round's line in the history: the reply's metrics, no row count."""
    return {"node": node, "epsilon": epsilon, "steps": 1.0, "train-seconds": 0.2, "noise-std": noise_std}


def test_deployment_card_states_the_head_rounds_from_what_the_coordinator_received(tmp_path):
    statistics = {"epsilon": 2.0, "noise-std": 1.5, "num-examples": 0.0, "steps": 1.0}
    history = [
        {"round": 0, "clients": [{"node": 11, **statistics}, {"node": 22, **statistics}]},
        *[
            {
                "round": r,
                "clients": [head_reply(11, 2 + r, 0.9), head_reply(22, 2 + r, 1.2)],
                "head_gradients": 2,
            }
            for r in (1, 2, 3)
        ],
    ]
    card = write_model_card(deployment_run(tmp_path, history)).read_text()
    for fact in (
        "- head rounds: in 3 rounds (1, 2, 3) the recipe planner chose head rounds (6 replies in all)",
        "so LoRA was not trained in them",
        "(noise std 0.9 to 1.2), with its epsilon and no row count",
        "The noise multiplier sigma and clip C are each institution's own (its ledger; the planner's head "
        "clip is 1): the coordinator receives only their product",
        "the epsilons below cover them",
        "- mechanism: no DP-SGD step of LoRA ran",
        "- what a head round's reply carries in the clear: epsilon, steps, train-seconds, noise-std (no row",
        "| node 11 | 5.0000 | its own |",
    ):
        assert fact in card, fact
    no_placeholder(card)


def test_a_run_without_privacy_spend_says_it_has_no_guarantee(tmp_path):
    history = [{"round": 1, "clients": [client(1, 0.0), client(2, 0.0)]}]
    card = write_model_card(deployment_run(tmp_path, history)).read_text()
    assert "No differential privacy" in card and "Not evaluated: no central evaluation" in card
    no_placeholder(card)


def test_a_folder_with_no_run_records_is_refused_in_one_line(tmp_path):
    with pytest.raises(CheckpointError, match=r"neither history\.json nor metrics\.json") as err:
        write_model_card(tmp_path)
    assert "\n" not in str(err.value)


def test_a_card_says_when_the_head_rounds_ran_under_secure_aggregation(tmp_path):
    """The history's secagg_* figures of a head round (server.secure_head) make the paragraph say that
    each vector left masked with a share of the noise and state the aggregation assumption."""
    figures = {
        "secagg_institutions": 3.0,
        "secagg_survivors": 3.0,
        "secagg_threshold": 2.0,
        "secagg_dropouts": 0.0,
        "secagg_colluders": 0.0,
    }
    history = [
        {"round": 0, "clients": [{"node": 11, "epsilon": 2.0, "noise-std": 1.5, "num-examples": 0.0}]},
        *[
            {
                "round": r,
                "clients": [head_reply(n, 2 + r, 0.5) for n in (11, 22, 33)],
                "head_gradients": 3,
                "aggregation": figures,
            }
            for r in (1, 2)
        ],
    ]
    card = write_model_card(deployment_run(tmp_path, history)).read_text()
    for fact in (
        "Under secure aggregation in rounds 1, 2: each vector left masked with only its institution's share",
        "the server unmasked only the sum, which carried sigma x C once",
        f"- distributed noise: each institution added Gaussian noise of std sigma x C / sqrt(3) (sigma "
        f"{0.5 * math.sqrt(3):g}, C 1)",
    ):
        assert fact in card, fact
    plain = [{**e, "aggregation": {}} for e in history]
    plain_card = write_model_card(deployment_run(tmp_path / "plain", plain)).read_text()
    assert "Under secure aggregation" not in plain_card
