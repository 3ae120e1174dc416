"""The one way every party turns a config into tokenizer, data and model."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from fedlora.common.config import FedloraConfig
from fedlora.common.data import DataBundle, build_data
from fedlora.common.errors import ConfigError
from fedlora.common.model import BuiltModel, build_model, load_tokenizer


@dataclass(frozen=True)
class Workbench:
    tokenizer: PreTrainedTokenizerBase
    data: DataBundle | None
    built: BuiltModel

    @property
    def labels(self) -> tuple[str, ...]:
        return self.data.labels if self.data is not None else ()


def prepare(cfg: FedloraConfig, with_data: bool = True) -> Workbench:
    """Tokenizer, data (unless a data-less coordinator asks) and the LoRA model for ``cfg``."""
    tokenizer = load_tokenizer(cfg.model)
    data = build_data(cfg, tokenizer) if with_data else None
    labels = data.labels if data is not None else labels_from_config(cfg)
    return Workbench(tokenizer, data, build_model(cfg.model, labels, len(tokenizer)))


def labels_from_config(cfg: FedloraConfig) -> tuple[str, ...]:
    if cfg.model.task != "classification":
        return ()
    if not cfg.data.labels:
        raise ConfigError("data.labels: a coordinator without data must list the label set")
    return cfg.data.labels
