"""What the ClientApp makes of the global adapter it receives, before any training."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedlora.client.app import load_global
from fedlora.common import protocol as P
from fedlora.common.adapter import adapter_state, load_adapter_state, to_record
from fedlora.common.errors import AdapterError
from fedlora.common.lora_math import dropped_factors, truncate_state
from fedlora.common.model import build_model
from helpers.messages import metadata

LABELS = ("cardio", "derm", "resp")


def train_message(
    state: dict[str, torch.Tensor],
    fingerprint: str,
    rank: int,
    scale: float,
    fold: dict[str, torch.Tensor] | None = None,
) -> Message:
    config = ConfigRecord({P.FINGERPRINT: fingerprint, P.LORA_R: rank, P.LORA_SCALE: scale, P.ROUND: 1})
    content = RecordDict({P.ARRAYS: to_record(state), P.CONFIG: config})
    if fold is not None:
        content[P.FOLD] = to_record(fold)
    return Message(content=content, metadata=metadata(0, 1))


def logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask)


@pytest.fixture
def global_rank8(make_config, vocab_size):
    """A rank-8 global adapter far from its initialisation, and the model that holds it."""
    cfg = make_config()
    built = build_model(cfg.model, LABELS, vocab_size)
    g = torch.Generator().manual_seed(5)
    state = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in adapter_state(built.model).items()}
    load_adapter_state(built.model, state)
    return cfg, built, state


@pytest.mark.parametrize("sender", ["client truncates", "server truncates"])
@pytest.mark.parametrize("fold", [True, False])
def test_a_rank_2_client_trains_its_own_rank_and_with_fold_sees_the_global_model(
    global_rank8, make_config, vocab_size, toy_classification, fold, sender
):
    """Either the client gets the rank-8 global adapter (the server does not know its rank yet), or
    the server sends the rank-2 truncation and what it drops (P.FOLD), as the strategy's _messages does."""
    cfg, server_model, state = global_rank8
    scale = cfg.model.lora_alpha / cfg.model.lora_r
    low = make_config({"model": {"lora_r": 2, "fold_remainder": fold}})
    low_scale = low.model.lora_alpha / 2
    client = build_model(low.model, LABELS, vocab_size)
    if sender == "client truncates":
        msg = train_message(state, client.fingerprint, 8, scale)
    else:
        own = truncate_state(state, 2, scale, low_scale)
        dropped = dropped_factors(state, own, 6, scale, low_scale)
        msg = train_message(own, client.fingerprint, 2, low_scale, fold=dropped)
    loaded = load_global(msg, low, client)

    assert all(v.shape[0] == 2 for k, v in loaded.items() if ".lora_A." in k)
    assert all(torch.equal(loaded[k], v) for k, v in adapter_state(client.model).items())
    data = toy_classification(n=8, num_labels=len(LABELS))
    ids, mask = data.input_ids, data.attention_mask
    gap = (logits(client.model, ids, mask) - logits(server_model.model, ids, mask)).abs().max()
    if fold:
        assert gap < 1e-5
    else:
        assert gap > 1e-3


def test_a_global_adapter_for_another_model_is_refused(global_rank8):
    cfg, built, state = global_rank8
    expected = f"fingerprint f00 does not match this client's {built.fingerprint}"
    with pytest.raises(AdapterError, match=expected):
        load_global(train_message(state, "f00", 8, 2.0), cfg, built)
