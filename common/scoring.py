"""Losses and held-out scoring, shared by the trainer (client) and central evaluation (server)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fedlora.common import protocol as P
from fedlora.common.adapter import peft_module
from fedlora.common.data import IGNORE_INDEX, ChoiceSet, TokenizedDataset


def trim(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Cut the padding columns no example of this batch uses (rows are right-padded)."""
    ids, mask, labels = batch
    width = max(int(mask.sum(1).max()), 1) if len(mask) else 1
    labels = labels[:, :width] if labels.dim() == 2 else labels
    return ids[:, :width], mask[:, :width], labels


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed negative log-likelihood of its labelled tokens, and their count; in
    fp32 whatever the base's precision."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    token = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    return token.sum(1), (shift_labels != IGNORE_INDEX).sum(1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over response tokens, then the batch mean: one example's gradient must
    not depend on the lengths of the others (Hugging Face's token-mean loss does)."""
    summed, counted = token_losses(logits, labels)
    return (summed / counted.clamp(min=1)).mean()


def forward_loss(model: nn.Module, task: str, batch: tuple[torch.Tensor, ...]) -> tuple:
    """(loss, logits) for one batch of the task."""
    ids, mask, labels = batch
    if task == "classification":
        logits = model(input_ids=ids, attention_mask=mask)
        return F.cross_entropy(logits, labels), logits
    logits = model(input_ids=ids, attention_mask=mask).logits
    return causal_lm_loss(logits, labels), logits


@torch.no_grad()
def option_loglikelihoods(
    module: nn.Module, choices: ChoiceSet, device: torch.device, batch_size: int = 64
) -> torch.Tensor:
    """Each (question, option) row's summed log-likelihood of the option's tokens after the prompt."""
    scores = []
    for batch in DataLoader(choices.rows, batch_size=batch_size):
        ids, mask, labels = tuple(t.to(device) for t in trim(batch))
        summed, _ = token_losses(module(input_ids=ids, attention_mask=mask).logits, labels)
        scores.append(-summed.double().cpu())
    return torch.cat(scores)


MACRO_F1 = P.MACRO_F1
RECALL = P.RECALL
"""Per-class recall keys: ``recall_<label index>``, for the classes the held-out rows contain."""
TOP_CLASS, TOP_SHARE = "top_class", "top_share"
"""The class predicted most often (its label index) and its share of the rows: a collapse shows here."""


def headline(scores: Mapping[str, float]) -> dict[str, float]:
    """The scores a one-line summary shows: all but the per-class detail (recall, the top class)."""
    return {k: v for k, v in scores.items() if not k.startswith(RECALL) and k != TOP_CLASS}


def class_scores(predicted: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Macro-F1, per-class recall and the most predicted class's share: accuracy alone hides a model
    that predicts the majority class everywhere. Macro-F1 averages over the classes that occur in
    the truth or the predictions (scikit-learn's ``f1_score(average="macro")``), F1 0 where a class is
    never right; recall is given for each class the truth contains."""
    classes = torch.unique(torch.cat([truth, predicted]))
    out: dict[str, float] = {}
    f1s = []
    for c in classes.tolist():
        hits = int(((predicted == c) & (truth == c)).sum())
        support, chosen = int((truth == c).sum()), int((predicted == c).sum())
        f1s.append(2 * hits / (support + chosen))
        if support:
            out[f"{RECALL}{c}"] = hits / support
    counts = torch.bincount(predicted)
    out[MACRO_F1] = sum(f1s) / max(len(f1s), 1)
    out[TOP_CLASS] = float(int(counts.argmax())) if len(predicted) else 0.0
    out[TOP_SHARE] = float(counts.max()) / len(predicted) if len(predicted) else 0.0
    return dict(sorted(out.items()))


def choice_accuracy(loglik: torch.Tensor, choices: ChoiceSet) -> dict[str, float]:
    """lm-evaluation-harness' two scores: ``accuracy`` picks the option of highest log-likelihood,
    ``accuracy_norm`` the highest per character (long options are not penalised for their length);
    a tie goes to the earlier option."""
    sizes = torch.bincount(choices.question).tolist()
    out = {}
    for name, score in (("accuracy", loglik), ("accuracy_norm", loglik / choices.chars.clamp(min=1))):
        picks = torch.tensor([int(group.argmax()) for group in score.split(sizes)])
        out[name] = float((picks == choices.answers).double().mean())
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module, task: str, data: TokenizedDataset, device: torch.device, batch_size: int = 64
) -> dict[str, float]:
    """Mean loss, and for classification accuracy with ``class_scores``, on held-out data. Causal
    LM: the perplexity of the responses (their token-mean log-likelihood), and where the data carry
    multiple-choice questions their accuracy (``choice_accuracy``)."""
    module = peft_module(model)
    was_training = module.training
    module.eval()
    total_loss, count, nll, tokens = 0.0, 0, 0.0, 0
    predicted, truth = [], []
    for batch in DataLoader(data, batch_size=batch_size):
        batch = tuple(t.to(device) for t in trim(batch))
        loss, logits = forward_loss(module, task, batch)
        total_loss += float(loss) * len(batch[0])
        count += len(batch[0])
        if task == "classification":
            predicted.append(logits.argmax(-1).cpu())
            truth.append(batch[2].cpu())
        else:
            summed, counted = token_losses(logits, batch[2])
            nll, tokens = nll + float(summed.sum()), tokens + int(counted.sum())
    metrics = {"loss": total_loss / max(count, 1), "examples": float(count)}
    if task == "classification":
        none = torch.zeros(0, dtype=torch.int64)
        picks, labels = torch.cat([none, *predicted]), torch.cat([none, *truth])
        metrics["accuracy"] = float((picks == labels).sum()) / max(count, 1)
        metrics |= class_scores(picks, labels)
    else:
        metrics["perplexity"] = math.exp(nll / max(tokens, 1))
        if data.choices is not None:
            loglik = option_loglikelihoods(module, data.choices, device, batch_size)
            metrics |= choice_accuracy(loglik, data.choices)
            metrics["questions"] = float(len(data.choices.answers))
    module.train(was_training)
    return metrics
