"""fedlora's pooled classifier for Transformers' Auto classes, shipped inside a merged export.

`fedlora-client export --merged` copies this file into the model folder and names it in the config's
``auto_map``, so ``AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)``
rebuilds the classifier the federation trained: an encoder, its token states mean- or CLS-pooled,
optionally L2-normalised, then a linear head. No stock class pools and normalises this way. The file
stands alone: it imports torch and transformers only, never fedlora.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class FedloraPooledConfig(PretrainedConfig):
    model_type = "fedlora_pooled"

    def __init__(
        self,
        encoder_config: dict | PretrainedConfig | None = None,
        pooling: str = "mean",
        normalize: bool = True,
        **kwargs,
    ) -> None:
        if isinstance(encoder_config, dict):
            settings = dict(encoder_config)
            encoder_config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        self.encoder_config = encoder_config
        self.pooling = pooling
        self.normalize = normalize
        super().__init__(**kwargs)


class FedloraPooledClassifier(PreTrainedModel):
    """Logits = head(normalize(pool(encoder(tokens)))), as fedlora.common.model.PooledClassifier."""

    config_class = FedloraPooledConfig
    base_model_prefix = "fedlora_pooled"
    _supports_sdpa = True

    def __init__(self, config: FedloraPooledConfig) -> None:
        super().__init__(config)
        self.encoder = AutoModel.from_config(config.encoder_config)
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # the encoder's own pooler is not part of this classifier
        self.classifier = nn.Linear(config.encoder_config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: object,
    ) -> SequenceClassifierOutput:
        """Token type ids and other tokenizer outputs are ignored, as in training."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if self.config.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        logits = self.classifier(pooled)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
