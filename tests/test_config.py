"""The config schema: defaults, one-line errors naming the file and key path, paths, round trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fedlora.common.config import (
    FedloraConfig,
    PrivacyConfig,
    config_from_dict,
    dump_yaml,
    load_config,
    to_dict,
)
from fedlora.common.errors import ConfigError


def write_config(folder: Path, text: str, name: str = "hospital-a.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert message.strip(), "empty error message"
    assert "\n" not in message, f"not one line: {message!r}"
    return message


def test_defaults_load_without_a_file():
    cfg = load_config()
    assert cfg == FedloraConfig()
    # Every section is present and typed as declared, not left as a raw mapping.
    sections = [f.name for f in dataclasses.fields(FedloraConfig) if f.name != "name"]
    assert sections
    for name in sections:
        assert dataclasses.is_dataclass(getattr(cfg, name)), name


def test_empty_file_and_empty_sections_give_the_defaults(tmp_path):
    assert load_config(write_config(tmp_path, "")) == FedloraConfig()
    assert load_config(write_config(tmp_path, "privacy: {}\n", "b.yaml")) == FedloraConfig()


def test_values_are_read_and_ints_become_floats(tmp_path):
    path = write_config(
        tmp_path,
        "name: hospital-a\nprivacy:\n  epsilon: 3\n  accountant: rdp\n"
        "model:\n  target_modules: [query, value]\ntraining:\n  batch_size: 16\n",
    )
    cfg = load_config(path)
    assert cfg.name == "hospital-a"
    assert cfg.privacy.epsilon == 3.0 and isinstance(cfg.privacy.epsilon, float)
    assert cfg.privacy.accountant == "rdp"
    assert cfg.model.target_modules == ("query", "value")
    assert cfg.training.batch_size == 16 and isinstance(cfg.training.batch_size, int)
    # Untouched keys keep their declared defaults.
    assert cfg.privacy.delta == PrivacyConfig().delta


BAD_FILES = {
    "malformed-yaml": ("privacy:\n  epsilon: [1, 2\n", ["malformed YAML", "line"]),
    "unknown-key": ("privacy:\n  epsilom: 3\n", ["privacy.epsilom", "unknown key"]),
    "unknown-section": ("privacyy:\n  epsilon: 3\n", ["privacyy", "unknown key"]),
    "wrong-type": ("training:\n  batch_size: many\n", ["training.batch_size", "integer", "'many'"]),
    "bool-for-int": ("training:\n  batch_size: true\n", ["training.batch_size", "integer"]),
    "float-for-int": ("training:\n  batch_size: 2.5\n", ["training.batch_size", "integer"]),
    "string-for-bool": ("privacy:\n  enabled: maybe\n", ["privacy.enabled", "true/false"]),
    "bad-list-item": ("model:\n  target_modules: [query, 3]\n", ["model.target_modules", "3"]),
    "out-of-range": (
        "privacy:\n  epsilon: -1\n",
        ["hospital-a.yaml: privacy.epsilon: must be > 0, got -1"],
    ),
    "out-of-range-ge": ("training:\n  batch_size: 0\n", ["training.batch_size", ">= 1", "got 0"]),
    "out-of-range-lt": ("privacy:\n  delta: 1\n", ["privacy.delta", "< 1"]),
    "bad-choice": ("privacy:\n  accountant: gdp\n", ["privacy.accountant", "prv", "rdp", "'gdp'"]),
    "non-mapping-top": ("- privacy\n- model\n", ["mapping at the top level", "list"]),
    "scalar-top": ("42\n", ["mapping at the top level", "int"]),
    "non-mapping-section": ("privacy: 3\n", ["privacy", "expected a mapping"]),
    "label-prompt-without-slot": ("model:\n  label_prompt: about it\n", ["model.label_prompt", "{}"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_one_line_naming_file_and_key(tmp_path, case):
    text, needles = BAD_FILES[case]
    path = write_config(tmp_path, text)
    message = config_error(path)
    assert str(path) in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.yaml"
    message = config_error(path)
    assert str(path) in message


BAD_OVERRIDES = {
    # A value the schema refuses: reported like a file value, with the file and key path.
    "out-of-range": ("privacy.epsilon=-2", ["hospital-a.yaml", "privacy.epsilon", "must be > 0"]),
    "unknown-key": ("privacy.epsilom=2", ["hospital-a.yaml", "privacy.epsilom", "unknown key"]),
    "wrong-type": ("training.batch_size=lots", ["hospital-a.yaml", "training.batch_size"]),
    # A malformed override: reported with the override itself, since it is not in the file.
    "no-equals": ("privacy.epsilon", ["--set", "privacy.epsilon", "key.path=value"]),
    "empty-key": ("=3", ["--set", "key.path=value"]),
    "bad-yaml-value": ("privacy.epsilon=[", ["--set", "privacy.epsilon", "not valid YAML"]),
    "through-a-leaf": ("privacy.epsilon.x=1", ["--set", "privacy.epsilon.x", "epsilon is not a section"]),
}


@pytest.mark.parametrize("case", sorted(BAD_OVERRIDES))
def test_bad_override_is_one_line_naming_key(tmp_path, case):
    override, needles = BAD_OVERRIDES[case]
    path = write_config(tmp_path, "privacy:\n  epsilon: 3\n")
    message = config_error(path, (override,))
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_overrides_apply_on_top_of_the_file_and_do_not_touch_it(tmp_path):
    path = write_config(tmp_path, "privacy:\n  epsilon: 3\n  delta: 1.0e-6\n")
    before = path.read_bytes()
    cfg = load_config(path, ["privacy.epsilon=4", "training.local_steps=7", "model.target_modules=[a, b]"])
    assert cfg.privacy.epsilon == 4.0
    assert cfg.privacy.delta == 1e-6  # from the file, not the default
    assert cfg.training.local_steps == 7
    assert cfg.model.target_modules == ("a", "b")
    assert path.read_bytes() == before
    # Later overrides win.
    assert load_config(path, ["privacy.epsilon=4", "privacy.epsilon=5"]).privacy.epsilon == 5.0


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "site" / "configs"
    path = write_config(
        folder,
        "data:\n  path: data/train.csv\n  eval_path: ../held-out.csv\nprivacy:\n  ledger_path: ledger.json\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("..") / "site" / "configs" / "hospital-a.yaml")
    assert Path(cfg.data.path).resolve() == (folder / "data" / "train.csv").resolve()
    assert Path(cfg.data.eval_path).resolve() == (tmp_path / "site" / "held-out.csv").resolve()
    assert Path(cfg.privacy.ledger_path).resolve() == (folder / "ledger.json").resolve()
    # The same file read from its own folder gives the same files.
    monkeypatch.chdir(folder)
    again = load_config("hospital-a.yaml")
    assert Path(again.data.path).resolve() == Path(cfg.data.path).resolve()
    # An absolute path is kept as written.
    absolute = tmp_path / "abs.csv"
    path2 = write_config(folder, f"data:\n  path: {absolute}\n", "b.yaml")
    assert load_config(path2).data.path == str(absolute)
    assert path.exists()


NON_DEFAULT = {
    "name": "hospital-a",
    "model": {"source": "tiny-bert", "lora_r": 4, "target_modules": ["query", "value"], "pooling": "cls"},
    "data": {"path": "/data/a.csv", "labels": ["x", "y", "z"], "max_length": 64},
    "training": {"learning_rate": 0.01, "head_learning_rate": 0.05, "batch_size": 8},
    "privacy": {"epsilon": 2.5, "delta": 1e-6, "accountant": "rdp", "planned_rounds": 3},
    "federation": {"rounds": 9, "max_update_norm": 5.0, "update_dtype": "fp16"},
    "security": {"node_public_keys": ["/k/a.pub", "/k/b.pub"]},
    "simulation": {"num_clients": 3, "partition": "iid"},
}


@pytest.mark.parametrize("data", [{}, NON_DEFAULT], ids=["defaults", "non-default"])
def test_to_dict_round_trips(data):
    cfg = config_from_dict(data)
    plain = to_dict(cfg)
    assert config_from_dict(plain) == cfg
    # What is written as YAML reads back to the same config (tuples travel as lists).
    assert config_from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg
    if data:
        assert cfg != FedloraConfig()
        assert plain["data"]["labels"] == ["x", "y", "z"]
        assert cfg.data.labels == ("x", "y", "z")
        assert cfg.planned_rounds == 3
    else:
        assert cfg.planned_rounds == cfg.federation.rounds


def test_config_from_dict_prefixes_its_source():
    with pytest.raises(ConfigError, match=r"^somewhere\.yaml: privacy\.epsilon: must be > 0"):
        config_from_dict({"privacy": {"epsilon": 0}}, source="somewhere.yaml")
