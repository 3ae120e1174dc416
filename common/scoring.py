"""Losses and held-out scoring, shared by the trainer (client) and central evaluation (server)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fedlora.common.adapter import peft_module
from fedlora.common.data import IGNORE_INDEX, TokenizedDataset


def trim(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Cut the padding columns no example of this batch uses (rows are right-padded)."""
    ids, mask, labels = batch
    width = max(int(mask.sum(1).max()), 1) if len(mask) else 1
    labels = labels[:, :width] if labels.dim() == 2 else labels
    return ids[:, :width], mask[:, :width], labels


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over response tokens, then the batch mean: one example's gradient must
    not depend on the lengths of the others (Hugging Face's token-mean loss does). In fp32 whatever
    the base's precision."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    token = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    counted = (shift_labels != IGNORE_INDEX).sum(1).clamp(min=1)
    return (token.sum(1) / counted).mean()


def forward_loss(model: nn.Module, task: str, batch: tuple[torch.Tensor, ...]) -> tuple:
    """(loss, logits) for one batch of the task."""
    ids, mask, labels = batch
    if task == "classification":
        logits = model(input_ids=ids, attention_mask=mask)
        return F.cross_entropy(logits, labels), logits
    logits = model(input_ids=ids, attention_mask=mask).logits
    return causal_lm_loss(logits, labels), logits


@torch.no_grad()
def evaluate(
    model: nn.Module, task: str, data: TokenizedDataset, device: torch.device, batch_size: int = 64
) -> dict[str, float]:
    """Mean loss, and accuracy for classification, on held-out data."""
    module = peft_module(model)
    was_training = module.training
    module.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in DataLoader(data, batch_size=batch_size):
        batch = tuple(t.to(device) for t in trim(batch))
        loss, logits = forward_loss(module, task, batch)
        total_loss += float(loss) * len(batch[0])
        count += len(batch[0])
        if task == "classification":
            correct += int((logits.argmax(-1) == batch[2]).sum())
    module.train(was_training)
    metrics = {"loss": total_loss / max(count, 1), "examples": float(count)}
    if task == "classification":
        metrics["accuracy"] = correct / max(count, 1)
    return metrics
