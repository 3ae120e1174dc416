"""common.rdp_memo: one step's RDP remembered per mechanism gives Opacus' own answers, bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as opacus_rdp

from fedlora.common import rdp_memo
from fedlora.common.accounting import compose

ORDERS = RDPAccountant.DEFAULT_ALPHAS


@pytest.mark.parametrize("q", [0.003, 0.25, 1.0])
@pytest.mark.parametrize("sigma", [0.6, 1.3, 7.0])
@pytest.mark.parametrize("steps", [1, 7, 1000])
def test_the_memo_gives_opacus_curve_bit_for_bit(q, sigma, steps):
    theirs = rdp_memo._OPACUS_COMPUTE_RDP(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
    for _ in range(2):  # computed, then remembered
        mine = rdp_memo.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
        assert np.array_equal(mine, theirs)
    scalar = rdp_memo.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=2.5)
    assert scalar == rdp_memo._OPACUS_COMPUTE_RDP(q=q, noise_multiplier=sigma, steps=steps, orders=2.5)


def test_a_remembered_curve_is_not_changed_by_its_users():
    first = rdp_memo.compute_rdp(q=0.1, noise_multiplier=1.1, steps=3, orders=ORDERS)
    first += 100.0
    again = rdp_memo.compute_rdp(q=0.1, noise_multiplier=1.1, steps=3, orders=ORDERS)
    assert np.array_equal(
        again, rdp_memo._OPACUS_COMPUTE_RDP(q=0.1, noise_multiplier=1.1, steps=3, orders=ORDERS)
    )


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_the_ledger_composition_equals_opacus_without_the_memo(monkeypatch, accountant):
    history = [(1.1, 0.05, 40), (1.1, 0.07, 12), (0.9, 0.05, 4)]
    mine = compose(accountant, history, 1e-5)
    assert opacus_rdp.compute_rdp is rdp_memo.compute_rdp
    monkeypatch.setattr(opacus_rdp, "compute_rdp", rdp_memo._OPACUS_COMPUTE_RDP)
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    with np.errstate(divide="ignore", over="ignore"):
        assert mine == acc.get_epsilon(delta=1e-5)


PROBE = """
import json
from opacus.accountants.analysis import rdp
original = rdp.compute_rdp
import fedlora.client.ledger
import fedlora.common.accounting as accounting
imported = rdp.compute_rdp is original
accounting.compose("rdp", [(1.0, 0.1, 5)], 1e-5)
print(json.dumps({"after_import": imported, "after_compose": rdp.compute_rdp is original}))
"""


def test_importing_the_ledger_leaves_opacus_alone_until_it_composes():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"after_import": True, "after_compose": False}
