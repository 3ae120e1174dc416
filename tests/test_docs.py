"""The documentation: the configuration reference is the schema's."""

from pathlib import Path

from fedlora.common.config_reference import COMMAND, reference_markdown

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


def test_configuration_reference_is_generated_from_the_current_schema():
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == reference_markdown(), f"docs/configuration.md is stale: run `{COMMAND}`"


def test_configuration_reference_lists_every_key_with_its_facts():
    page = reference_markdown()
    assert COMMAND in page.split("\n## ")[0]
    row = next(line for line in page.splitlines() if line.startswith("| `privacy.delta` |"))
    assert row.split(" | ")[1:5] == ["a number", "`1e-05`", "> 0, < 1", "institution, simulation"]
    assert "| `federation.aggregator` | a string | `fedavg` | `fedavg`, `exact`, `ffa` | coordinator," in page
    assert "`training.batch_size` | an integer or null | `null` (recipe manual: `32`)" in page
