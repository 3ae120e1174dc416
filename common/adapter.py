"""The adapter wire format shared by server and clients: tensors <-> Flower records, deltas,
validation of what arrives, and export as a standard PEFT adapter folder."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from peft import PeftModel, get_peft_model_state_dict
from torch import nn

from fedlora.common.errors import AdapterError
from fedlora.common.model import base_reference

State = dict[str, torch.Tensor]
WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
METADATA_FILE = "fedlora.json"
CARD_FILE = "README.md"
PEFT_CONFIG_FILE = "adapter_config.json"


def peft_module(model: nn.Module) -> PeftModel:
    """The PeftModel inside an Opacus wrapper (GradSampleModule keeps it as ``_module``)."""
    while not isinstance(model, PeftModel):
        inner = getattr(model, "_module", None)
        if inner is None:
            raise AdapterError(f"expected a PEFT model, got {type(model).__name__}")
        model = inner
    return model


def peft_state(model: nn.Module) -> State:
    """PEFT's own state dict of the active adapter, whatever its name: keys without the name, tensors
    sharing the parameters' storage."""
    inner = peft_module(model)
    return get_peft_model_state_dict(inner, adapter_name=inner.active_adapter)


def adapter_state(model: nn.Module, keys: Iterable[str] | None = None) -> State:
    """A detached fp32 copy of the adapter's tensors (optionally only ``keys``)."""
    state = peft_state(model)
    wanted = set(keys) if keys is not None else None
    return {
        k: v.detach().to("cpu", torch.float32).clone()
        for k, v in state.items()
        if wanted is None or k in wanted
    }


def load_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load adapter tensors (a full or partial set of the model's keys) into the model: copied into
    PEFT's own state dict of the adapter, whose tensors are the parameters' storage, once every key
    and shape is checked (PEFT's set_peft_model_state_dict rebuilds and remaps the whole dict: a
    millisecond more per message, README "A thousand institutions")."""
    current = peft_state(model)
    unknown = sorted(set(state) - set(current))
    if unknown:
        raise AdapterError(f"adapter key {unknown[0]!r} does not exist in this model")
    storage = {t.data_ptr() for t in model.parameters()}
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(current[key].shape):
            raise AdapterError(
                f"adapter key {key!r}: shape {tuple(tensor.shape)}, expected {tuple(current[key].shape)}"
            )
        if current[key].data_ptr() not in storage:
            raise AdapterError(f"adapter key {key!r}: PEFT's state dict holds a copy, not the parameter")
    with torch.no_grad():
        for key, tensor in state.items():
            current[key].copy_(tensor)


def fold_into_base(model: nn.Module, changes: Mapping[str, torch.Tensor]) -> None:
    """Add a fixed weight change (by LoRA layer prefix, ``[out, in]``) to that layer's frozen base.

    The base tensors may be shared with other model copies (see model.build_model), so they are
    never written: each changed layer gets a new frozen tensor of its own.
    """
    inner = peft_module(model)
    for prefix, change in changes.items():
        try:
            layer = inner.get_submodule(prefix)
        except AttributeError:
            raise AdapterError(f"fold into base: no layer {prefix!r} in this model") from None
        base = layer.get_base_layer()
        weight = base.weight
        delta_w = change.T if getattr(layer, "fan_in_fan_out", False) else change
        if tuple(delta_w.shape) != tuple(weight.shape):
            raise AdapterError(
                f"fold into base: {prefix} change {tuple(delta_w.shape)}, weight {tuple(weight.shape)}"
            )
        folded = weight.detach() + delta_w.to(weight.device, weight.dtype)
        base.weight = nn.Parameter(folded, requires_grad=False)


def to_record(state: Mapping[str, torch.Tensor], dtype: str = "fp32") -> ArrayRecord:
    """Flower can't carry bf16: tensors go as fp32 (or fp16 to halve traffic)."""
    wire = WIRE_DTYPES[dtype]
    return ArrayRecord({k: v.detach().to("cpu", wire).contiguous() for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    try:
        state = record.to_torch_state_dict()
    except Exception as err:  # a malformed array from a peer: any decode failure is a reject
        raise AdapterError(f"cannot decode arrays: {err}") from None
    return {k: v.to(torch.float32) for k, v in state.items()}


def delta(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> State:
    return {k: new[k] - old[k] for k in new}


def l2_norm(state: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values()))


def non_finite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys whose tensors hold NaN or inf, sorted: such an adapter is never sent or exported."""
    return sorted(key for key, tensor in state.items() if not torch.isfinite(tensor).all())


def shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def export_adapter(model: nn.Module, out_dir: str | Path, metadata: Mapping[str, Any]) -> Path:
    """A standard PEFT folder (adapter_config.json + adapter_model.safetensors) that
    ``PeftModel.from_pretrained(base, out_dir)`` loads, plus what fedlora needs to rebuild the base
    (``metadata``: the ``config`` and ``fingerprint``). With a config, the adapter names its base model.
    PEFT's empty README template is dropped: the model card is written from the run's records
    (common.model_card), so a placeholder never stands in for it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_module(model).save_pretrained(out, safe_serialization=True)
    (out / CARD_FILE).unlink(missing_ok=True)
    recorded = dict(metadata)
    source = metadata.get("config", {}).get("model", {}).get("source")
    if source is not None:
        # Written into the file only: on the live model, PEFT would look the name up at every
        # get_peft_model_state_dict (a hub query, or a warning offline).
        base = base_reference(str(source))
        config_path = out / PEFT_CONFIG_FILE
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        recorded["base_model"] = {"name_or_path": base, "fingerprint": metadata.get("fingerprint")}
    (out / METADATA_FILE).write_text(json.dumps(recorded, indent=2, default=str))
    return out
