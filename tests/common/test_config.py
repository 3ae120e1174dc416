"""The config schema: defaults, one-line errors naming the file and key path, paths, round trips."""

from __future__ import annotations

import dataclasses
import time
import typing
from pathlib import Path

import pytest
import yaml

from fedlora.common.config import (
    FedloraConfig,
    PrivacyConfig,
    config_from_dict,
    describe,
    dump_yaml,
    load_config,
    read_yaml,
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
    "bad-dtype": ("model:\n  dtype: int8\n", ["model.dtype", "bf16", "'int8'"]),
    "bad-quantization": ("model:\n  quantization: 4bit\n", ["model.quantization", "4bit-nf4", "'4bit'"]),
    "zero-physical-batch": (
        "training:\n  physical_batch_size: 0\n",
        ["training.physical_batch_size", ">= 1"],
    ),
    "checkpointing-classification": (
        "training:\n  gradient_checkpointing: true\n",
        ["training.gradient_checkpointing", "causal-lm"],
    ),
    "physical-batch-ghost": (
        "training:\n  physical_batch_size: 4\nprivacy:\n  grad_sample_mode: ghost\n",
        ["training.physical_batch_size", "hooks"],
    ),
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
        "data:\n  path: data/train.csv\n  eval_path: ../held-out.csv\nprivacy:\n  ledger_path: ledger.json\n"
        "  audit_log: logs/audit.jsonl\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("..") / "site" / "configs" / "hospital-a.yaml")
    assert Path(cfg.data.path).resolve() == (folder / "data" / "train.csv").resolve()
    assert Path(cfg.data.eval_path).resolve() == (tmp_path / "site" / "held-out.csv").resolve()
    assert Path(cfg.privacy.ledger_path).resolve() == (folder / "ledger.json").resolve()
    assert Path(cfg.privacy.audit_log).resolve() == (folder / "logs" / "audit.jsonl").resolve()
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


# --- Persona roots: each file is checked as what it is for. ---

COORDINATOR = "name: coordinator\nfederation:\n  rounds: 3\n  min_clients: 6\n"


def persona_error(path: Path, persona: str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, persona=persona)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_a_coordinator_needing_more_clients_than_the_simulation_default_is_accepted(tmp_path):
    path = write_config(tmp_path, COORDINATOR, "coordinator.yaml")
    assert load_config(path, persona="coordinator").federation.min_clients == 6
    # The same numbers in a simulation are still refused: there, the clients are its own.
    sim = write_config(tmp_path, "federation:\n  min_clients: 6\nsimulation:\n  num_clients: 5\n", "sim.yaml")
    assert "simulation.num_clients 5" in persona_error(sim, "simulation")


FOREIGN_KEYS = {
    "institution": [
        ("simulation:\n  num_clients: 3\n", "simulation.num_clients"),
        ("federation:\n  min_clients: 2\n", "federation.min_clients"),
        ("federation:\n  aggregator: exact\n", "federation.aggregator"),
        ("security:\n  server_key: server.key\n", "security.server_key"),
    ],
    "coordinator": [
        ("privacy:\n  epsilon: 4\n", "privacy.epsilon"),
        ("training:\n  local_steps: 3\n", "training.local_steps"),
        ("simulation:\n  partition: iid\n", "simulation.partition"),
        ("security:\n  node_private_key: node.key\n", "security.node_private_key"),
    ],
    "simulation": [
        ("security:\n  ca_cert: ca.crt\n", "security.ca_cert"),
        ("federation:\n  superlink_address: 127.0.0.1:9092\n", "federation.superlink_address"),
        ("privacy:\n  ledger_path: ledger.json\n", "privacy.ledger_path"),
    ],
}


@pytest.mark.parametrize(
    ("persona", "text", "key"),
    [(persona, text, key) for persona, cases in FOREIGN_KEYS.items() for text, key in cases],
)
def test_a_key_of_another_persona_is_refused_in_one_line(tmp_path, persona, text, key):
    path = write_config(tmp_path, text)
    message = persona_error(path, persona)
    article = "an" if persona == "institution" else "a"
    assert f"{path}: {key}: not {article} {persona} setting ({persona} configs set: name, model" in message
    # An override is held to the same rule as the file.
    section, _, leaf = key.partition(".")
    value = yaml.safe_load(text)[section][leaf]
    empty = write_config(tmp_path, "", "empty.yaml")
    assert key in persona_error(empty, persona, (f"{key}={value}",))


def test_each_persona_sets_what_it_uses(tmp_path):
    institution = write_config(
        tmp_path,
        "name: a\nmodel: {variant: ffa}\nprivacy: {epsilon: 3, ledger_path: l.json}\n"
        "federation: {rounds: 4, superlink_address: '10.0.0.1:9092'}\n"
        "security: {ca_cert: ca.crt, node_private_key: node.key}\n",
        "institution.yaml",
    )
    cfg = load_config(institution, persona="institution")
    assert cfg.planned_rounds == 4 and cfg.model.variant == "ffa"
    coordinator = write_config(
        tmp_path,
        "model: {lora_r: 16}\ndata: {labels: [a, b]}\ntraining: {device: cpu, learning_rate: 0.01}\n"
        "federation: {aggregator: exact, max_update_norm: 5}\n"
        "security: {ca_cert: ca.crt, server_cert: s.pem, server_key: s.key, node_public_keys: [a.pub]}\n",
        "coordinator.yaml",
    )
    assert load_config(coordinator, persona="coordinator").federation.aggregator == "exact"


CROSS_CHECKS = {
    # An institution never sets the aggregator, so its FFA variant is not checked against one...
    "institution": ("training:\n  local_steps: 0\n", "training.local_steps: 0 trains nothing"),
    # ... while the coordinator's aggregator must fit its own model layout.
    "coordinator": ("federation:\n  aggregator: ffa\n", "federation.aggregator: 'ffa' needs model.variant"),
    "simulation": ("simulation:\n  num_clients: 2\n  client_ranks: [4]\n", "1 ranks for 2 clients"),
}


@pytest.mark.parametrize("persona", sorted(CROSS_CHECKS))
def test_each_persona_gets_its_own_cross_checks(tmp_path, persona):
    text, needle = CROSS_CHECKS[persona]
    assert needle in persona_error(write_config(tmp_path, text), persona)
    # And none of another persona's: the others' file with a persona's settings left at defaults.
    foreign = {
        "institution": "model:\n  variant: ffa\n",
        "coordinator": "federation:\n  min_clients: 9\n",
        "simulation": "privacy:\n  enabled: false\ntraining:\n  local_steps: 0\n",
    }[persona]
    assert load_config(write_config(tmp_path, foreign, "ok.yaml"), persona=persona)


def shipped(folder: str) -> list[Path]:
    return sorted((Path(__file__).parents[2] / "configs" / folder).glob("*.yaml"))


@pytest.mark.parametrize(
    ("path", "persona"),
    [(p, "institution") for p in shipped(".")] + [(p, "simulation") for p in shipped("simulation")],
    ids=lambda v: v.name if isinstance(v, Path) else v,
)
def test_every_shipped_config_is_valid_for_its_persona(path, persona):
    cfg = load_config(path, persona=persona)
    # What a persona's config dumps reads back as that persona's file, to the same config.
    assert config_from_dict(yaml.safe_load(dump_yaml(cfg, persona)), persona=persona) == cfg


def test_a_persona_documents_only_its_own_keys():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "fedlora.common.config", "coordinator"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    keys = [line.split(":")[0] for line in out.stdout.splitlines() if not line.startswith("#")]
    assert "federation.min_clients" in keys and "security.node_public_keys" in keys
    assert not [k for k in keys if k.startswith(("privacy.", "simulation."))]
    assert "federation.min_clients: an integer, default 2. Fewest clients a round needs." in out.stdout
    institution = describe("institution")
    assert "privacy.epsilon: a number, default 8.0." in institution
    assert "simulation." not in institution and "federation.min_clients" not in institution


def float_fields() -> list[str]:
    """Every number-valued key of the schema, found from the dataclasses (new ones included)."""
    keys = []
    for section, cls in typing.get_type_hints(FedloraConfig).items():
        if dataclasses.is_dataclass(cls):
            for key, tp in typing.get_type_hints(cls).items():
                if tp is float or float in typing.get_args(tp):
                    keys.append(f"{section}.{key}")
    return keys


@pytest.mark.parametrize("key", float_fields())
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused_naming_the_key(tmp_path, key, value):
    section, _, leaf = key.partition(".")
    path = write_config(tmp_path, f"{section}:\n  {leaf}: {value}\n")
    message = config_error(path)
    assert f"{path}: {key}: must be a finite number" in message, message
    assert key in config_error(write_config(tmp_path, "", "b.yaml"), (f"{key}={value}",))


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: h\u00f4pital-a\n".encode("latin-1"))
    message = config_error(path)
    assert f"{path}: not UTF-8 text" in message


@pytest.mark.parametrize("prompt", ["{} {}", "{label}", "{0}{1}", "{0}", "{:{}}", "{{}}", "a {", "{}}"])
def test_label_prompt_needs_exactly_one_positional_slot(tmp_path, prompt):
    path = write_config(tmp_path, yaml.safe_dump({"model": {"label_prompt": prompt}}))
    message = config_error(path)
    assert f"{path}: model.label_prompt: must contain exactly one {{}}" in message, message


@pytest.mark.parametrize("prompt", ["{}", "a review of a drug for {}", "{!r} (a label)"])
def test_label_prompt_with_one_slot_is_accepted(tmp_path, prompt):
    path = write_config(tmp_path, yaml.safe_dump({"model": {"label_prompt": prompt}}))
    assert load_config(path).model.label_prompt.format("x")


def test_every_command_reads_its_file_as_its_persona(tmp_path, capsys):
    """The issue's case end to end: fedlora-server and the ServerApp take the coordinator's file,
    fedlora-client and the ClientApp refuse a simulation key, fedlora-simulate a deployment key."""
    from types import SimpleNamespace

    from fedlora.client import cli as client_cli
    from fedlora.client.app import setup_from_node_config
    from fedlora.server import cli as server_cli
    from fedlora.server.app import settings_from_run_config
    from fedlora.simulations import cli as sim_cli

    coordinator = write_config(tmp_path, COORDINATOR, "coordinator.yaml")
    assert server_cli.main(["status", str(coordinator), "--out", str(tmp_path / "run")]) == 0
    assert "0 of 3" in "".join(capsys.readouterr())
    settings = settings_from_run_config(SimpleNamespace(run_config={"config": str(coordinator)}))
    assert settings.num_clients == 6

    institution = write_config(
        tmp_path, "security:\n  node_private_key: node.key\nsimulation:\n  num_clients: 3\n", "inst.yaml"
    )
    assert client_cli.main(["keys", str(institution)]) == 2
    assert "simulation.num_clients: not an institution setting" in capsys.readouterr().err
    assert not (tmp_path / "node.key").exists()
    with pytest.raises(ConfigError, match=r"simulation\.num_clients: not an institution setting"):
        setup_from_node_config(SimpleNamespace(node_config={"config": str(institution)}, node_id=1))

    simulation = write_config(tmp_path, "security:\n  ca_cert: ca.crt\n", "sim.yaml")
    assert sim_cli.main([str(simulation), "--out", str(tmp_path / "sim-run")]) == 2
    assert "security.ca_cert: not a simulation setting" in capsys.readouterr().err
    assert not (tmp_path / "sim-run").exists()


# YAML 1.2 numbers (issue 29): PyYAML reads YAML 1.1, where these forms are strings.
YAML12_NUMBERS = {
    "privacy:\n  delta: 1e-5\n": ("privacy", "delta", 1e-5),
    "privacy:\n  epsilon: 1E5\n": ("privacy", "epsilon", 1e5),
    "training:\n  learning_rate: .5\n": ("training", "learning_rate", 0.5),
    "federation:\n  max_update_norm: 1.0e38\n": ("federation", "max_update_norm", 1e38),
    "privacy:\n  epsilon: +2e3\n": ("privacy", "epsilon", 2000.0),
}


@pytest.mark.parametrize("text", sorted(YAML12_NUMBERS))
def test_yaml_1_2_numbers_are_numbers_in_files_and_overrides(tmp_path, text):
    section, key, expected = YAML12_NUMBERS[text]
    cfg = load_config(write_config(tmp_path, text))
    assert getattr(getattr(cfg, section), key) == expected
    written = text.split(": ")[1].strip()
    by_override = load_config(None, [f"{section}.{key}={written}"])
    assert getattr(getattr(by_override, section), key) == expected


def test_yaml_1_2_negative_and_signed_forms_read_as_floats(tmp_path):
    path = write_config(tmp_path, "a: -2e3\nb: -.5\nc: 1.\nd: 3\ne: 1_000\n")
    assert read_yaml(path) == {"a": -2000.0, "b": -0.5, "c": 1.0, "d": 3, "e": 1000}
    assert isinstance(read_yaml(path)["d"], int)


def test_a_quoted_number_stays_a_string_and_is_written_back_quoted(tmp_path):
    path = write_config(tmp_path, "name: '1e5'\ndata:\n  labels: ['1e5', \"2E3\", .5x]\n")
    cfg = load_config(path)
    assert cfg.name == "1e5" and cfg.data.labels == ("1e5", "2E3", ".5x")
    text = dump_yaml(cfg)
    assert "name: '1e5'" in text and "- '2E3'" in text
    reread = load_config(write_config(tmp_path, text, name="again.yaml"))
    assert (reread.name, reread.data.labels) == (cfg.name, cfg.data.labels)


def test_a_number_where_a_string_belongs_is_one_line(tmp_path):
    message = config_error(write_config(tmp_path, "name: 1e5\n"))
    assert "name" in message and "100000.0" in message


def billion_laughs(levels: int, mapping: bool) -> str:
    """Each level repeats the previous one ten times by alias: 10**levels values once expanded."""
    lines = ["lol0: &lol0 {x: lol}" if mapping else "lol0: &lol0 [lol]"]
    for i in range(1, levels + 1):
        items = ", ".join(f"{k}: *lol{i - 1}" if mapping else f"*lol{i - 1}" for k in "abcdefghij")
        lines.append(f"lol{i}: &lol{i} {{{items}}}" if mapping else f"lol{i}: &lol{i} [{items}]")
    return "privacy:\n  epsilon: 3\n" + "\n".join(f"x{line}" for line in lines) + "\n"


@pytest.mark.parametrize("mapping", [False, True], ids=["lists", "mappings"])
def test_yaml_aliases_are_refused_in_one_line_before_anything_expands(tmp_path, mapping):
    path = write_config(tmp_path, billion_laughs(9, mapping))
    started = time.perf_counter()
    message = config_error(path)
    assert time.perf_counter() - started < 2
    assert str(path) in message and "alias *lol0 refused" in message and "line 4" in message
    merge = write_config(tmp_path, "base: &b {epsilon: 3}\nprivacy:\n  <<: *b\n", name="merge.yaml")
    assert "alias *b refused" in config_error(merge)
