"""Fixtures of the common/ tests."""

import numpy as np
import pytest
from opacus.accountants import create_accountant
from opacus.accountants.analysis import rdp as opacus_rdp

from fedlora.common import rdp_memo

OPACUS_DELTA = 1e-5


@pytest.fixture
def opacus_epsilon(monkeypatch):
    """Opacus' epsilon at delta 1e-5 of a history, from a fresh accountant using Opacus' own RDP
    function (not fedlora's memo): the independent check of fedlora's accounting."""

    def epsilon(mechanism: str, history: list[tuple[float, float, int]]) -> float:
        monkeypatch.setattr(opacus_rdp, "compute_rdp", rdp_memo._OPACUS_COMPUTE_RDP)
        acc = create_accountant(mechanism=mechanism)
        acc.history = list(history)
        with np.errstate(divide="ignore", over="ignore"):
            return float(acc.get_epsilon(delta=OPACUS_DELTA))

    return epsilon
