"""Tests that start real Flower processes (SuperLink, SuperNodes, Ray, the institution's daemon) over
loopback: every test in this folder is marked ``integration`` (``-m "not integration"`` skips them)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)
