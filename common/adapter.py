"""The adapter wire format shared by server and clients: tensors <-> Flower records, deltas,
validation of what arrives, and export as a standard PEFT adapter folder and its checked reload."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from fedlora.common.errors import AdapterError
from fedlora.common.model import LORA_LAYERS, base_reference

State = dict[str, torch.Tensor]
WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
METADATA_FILE = "fedlora.json"
CARD_FILE = "README.md"
PEFT_CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Settings fedlora never writes that would change the layout beyond target_modules and r.
UNWRITTEN_SETTINGS = ("rank_pattern", "alpha_pattern")


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


def load_adapter_folder(base: nn.Module, folder: Path) -> PeftModel:
    """A PEFT adapter folder onto ``base``, for inference, refusing in one line what PEFT would load
    unsafely, wastefully or silently wrong: weights other than safetensors (a pickle runs code), a
    layout or rank the base cannot hold (checked before PEFT allocates: r of 1e6 is gigabytes), and
    any adapter tensor that does not land in the model (PEFT drops it with a warning) or is missing."""
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        found = f" ({pickles[0]} is a pickle file, never loaded)" if pickles else ""
        raise AdapterError(f"{folder}: no {WEIGHTS_FILE}{found}; adapter weights are read from safetensors")
    model = PeftModel(base, checked_lora_config(folder, base))
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{weights}: unreadable safetensors ({err})") from None
    missing = sorted(set(peft_state(model)) - set(state))
    if missing:
        raise AdapterError(f"{weights}: no tensor for {missing[0]!r} ({len(missing)} of the layout missing)")
    try:
        load_adapter_state(model, state)
    except AdapterError as err:
        raise AdapterError(f"{weights}: {err} (adapter_config.json and the weights disagree)") from None
    return model.eval()


def checked_lora_config(folder: Path, base: nn.Module) -> LoraConfig:
    """The folder's LoRA config for inference, once its targets are layers of ``base`` that LoRA
    adapts, named in a list (a pattern string matches unseen layers), and its rank fits them."""
    path = folder / PEFT_CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AdapterError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise AdapterError(f"{path}: peft_type {kind!r}; expected 'LORA'")
    targets = raw.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{path}: target_modules {str(targets)[:80]!r}; expected a list of layer names")
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LORA_LAYERS)}
    adapted: set[str] = set()
    for target in targets:
        hits = {name for name in layers if name == target or name.endswith(f".{target}")}
        if not hits:
            raise AdapterError(f"{path}: target_modules names {target[:80]!r}, no layer of the base model")
        adapted |= hits
    bound = min(min(layers[name].weight.shape[:2]) for name in adapted)
    rank = raw.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= bound:
        raise AdapterError(f"{path}: r {str(rank)[:40]}; expected 1 to {bound}, the adapted layers' size")
    alpha = raw.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{path}: lora_alpha {str(alpha)[:40]}; expected a finite number")
    unwritten = [key for key in UNWRITTEN_SETTINGS if raw.get(key)]
    if unwritten:
        raise AdapterError(f"{path}: {unwritten[0]} is set; a fedlora adapter has one rank and alpha for all")
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except (TypeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise AdapterError(f"{path}: not a LoRA config PEFT accepts ({first})") from None
    config.inference_mode = True
    # The base is already built; named here, PEFT would look it up (a hub query) at every state dict.
    config.base_model_name_or_path = None
    return config
