"""The documentation: the site builds with no warning, the configuration reference is the schema's,
and the README stays short with its two commands first."""

import os
import subprocess
import sys
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


def test_site_builds_strictly_without_a_warning(tmp_path):
    site = tmp_path / "site"
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml")]
    done = subprocess.run(
        [*build, "--site-dir", str(site)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's end-of-life banner
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stderr, done.stderr[-3000:]
    architecture = (site / "architecture" / "index.html").read_text(encoding="utf-8")
    assert "fedlora.server.app.run_server" in architecture  # ARCHITECTURE.md included, not copied
    assert "fonts.googleapis.com" not in (site / "index.html").read_text(encoding="utf-8")


def test_readme_is_short_and_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(readme) < 150
    assert readme.index("```bash") < 15
    first_block = readme[readme.index("```bash") + 1 : readme.index("```", readme.index("```bash") + 1)]
    assert [line.split("#")[0].strip() for line in first_block] == [
        "bash .ci/install && fedlora-simulate",
        "bash .ci/install && python3 -m pytest -q -n 2 --dist loadfile",
    ]
    assert "python3 -m pytest -q -n 2 --dist loadfile" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
