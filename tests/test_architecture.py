"""The import rules of ARCHITECTURE.md, enforced: they keep the institution's code free of the
coordinator's and both free of the researcher's."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder -> the fedlora packages its modules must never import
FORBIDDEN = {
    "common": ("fedlora.client", "fedlora.server", "fedlora.simulations", "benchmarks"),
    "client": ("fedlora.server", "fedlora.simulations", "benchmarks"),
    "server": ("fedlora.client", "fedlora.simulations", "benchmarks"),
    # Installed, so it cannot lean on the repository's benchmarks/ (not installed).
    "simulations": ("benchmarks",),
}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name a file imports, at any depth of the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_production_code_keeps_the_import_rules(folder: str) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no modules found under {folder}/"
    broken = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in sorted(imported_modules(path))
        if any(name == bad or name.startswith(f"{bad}.") for bad in FORBIDDEN[folder])
    ]
    assert not broken, "; ".join(broken)


def test_the_rule_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from fedlora.server.strategy import build_strategy\n")
    assert "fedlora.server.strategy" in imported_modules(module)


def dotted_names(text: str) -> set[str]:
    return set(re.findall(r"\bfedlora(?:\.[A-Za-z_]\w*)+", text))


def resolves(name: str) -> bool:
    """Whether ``name`` is a module, or an attribute path inside the longest importable module."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                target = getattr(target, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_name_the_architecture_map_gives_exists() -> None:
    names = dotted_names((ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8"))
    assert len(names) > 20
    missing = sorted(name for name in names if not resolves(name))
    assert not missing, f"ARCHITECTURE.md names what the code does not have: {', '.join(missing)}"


def test_the_name_check_catches_a_stale_name() -> None:
    assert resolves("fedlora.client.ledger.PrivacyLedger.reserve")
    assert not resolves("fedlora.client.ledger.PrivacyLedger.commit")
