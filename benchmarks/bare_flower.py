"""The baselines fedlora's overhead is measured against: minimal Flower apps, no fedlora code.

`echo_app` replies with the arrays it was sent (no torch in the client at all). `lora_app` is what a
minimal Flower LoRA app does with training switched off (the shape of FlowerTune's client): it loads
the same base model with Transformers, applies the same LoRA layout with PEFT, loads the global
adapter into it and sends its adapter back. Both live in an importable module so that Ray's actors
unpickle them by reference and keep the per-process model cache between messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForSequenceClassification


def echo_app() -> ClientApp:
    client = ClientApp()

    @client.train()
    def train(msg: Message, _context: Context) -> Message:
        reply = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})})
        return Message(content=reply, reply_to=msg)

    return client


@dataclass(frozen=True)
class LoraSpec:
    """The base model folder and LoRA layout, as plain values (hashable, picklable)."""

    folder: str
    num_labels: int
    r: int
    alpha: int
    targets: tuple[str, ...]


@lru_cache(maxsize=1)
def lora_model(spec: LoraSpec) -> torch.nn.Module:
    """One model per process, as a minimal app would keep it."""
    base = AutoModelForSequenceClassification.from_pretrained(
        spec.folder, num_labels=spec.num_labels, local_files_only=True
    )
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.targets), modules_to_save=["classifier"]
    )
    return get_peft_model(base, config)


def initial_adapter(spec: LoraSpec) -> ArrayRecord:
    return ArrayRecord(get_peft_model_state_dict(lora_model(spec)))


def load_and_send(spec: LoraSpec, received: ArrayRecord) -> ArrayRecord:
    """A round with training off: the global adapter in, this client's adapter out."""
    model = lora_model(spec)
    set_peft_model_state_dict(model, received.to_torch_state_dict())
    return ArrayRecord(get_peft_model_state_dict(model))


def lora_app(spec: LoraSpec) -> ClientApp:
    client = ClientApp()

    @client.train()
    def train(msg: Message, _context: Context) -> Message:
        arrays = load_and_send(spec, msg.content["arrays"])
        reply = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})})
        return Message(content=reply, reply_to=msg)

    return client
