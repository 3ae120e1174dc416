"""The floor any fine-tune must beat: a non-private linear probe on the frozen base model's features.

A linear model on good fixed features is a strong baseline (Tramer and Boneh 2021, "Differentially
Private Learning Needs Better Features"); a LoRA fine-tune, private or not, that scores below it
did not earn its cost. The probe: the frozen base (no LoRA), mean-pooled token states, not
normalised; multinomial logistic regression with scikit-learn's default objective (summed
cross-entropy + ||W||^2 / (2C)) fitted by L-BFGS in torch, so no new dependency.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fedlora.common.config import ModelConfig
from fedlora.common.data import TokenizedDataset
from fedlora.common.model import build_base_model
from fedlora.common.scoring import trim


@torch.no_grad()
def embed(model: nn.Module, data: TokenizedDataset, batch_size: int = 64) -> torch.Tensor:
    """The pooled vectors the model's head would see, for every row."""
    model.eval()
    return torch.cat([model.embed(*trim(batch)[:2]) for batch in DataLoader(data, batch_size=batch_size)])


def frozen_features(
    cfg: ModelConfig, labels: Sequence[str], vocab_size: int, *datasets: TokenizedDataset
) -> list[torch.Tensor]:
    """Mean-pooled, unnormalised features of the frozen base for each dataset (one model load)."""
    frozen = dataclasses.replace(cfg, pooling="mean", normalize=False, head_init="zero")
    base = build_base_model(frozen, labels, vocab_size)
    return [embed(base, data) for data in datasets]


def logistic_regression(x: torch.Tensor, y: torch.Tensor, classes: int, c: float = 1.0) -> nn.Linear:
    """Multinomial LR, scikit-learn's objective: sum of cross-entropies + ||W||^2 / (2C), L-BFGS."""
    head = nn.Linear(x.shape[1], classes).double()
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    xd = x.double()
    opt = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=1000, tolerance_grad=1e-8, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(xd), y, reduction="sum") + head.weight.pow(2).sum() / (2 * c)
        loss.backward()
        return loss

    opt.step(closure)
    return head


@torch.no_grad()
def score(head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Held-out accuracy and mean cross-entropy, as the scorer of fine-tuned models reports them."""
    logits = head(x.double())
    return {
        "accuracy": float((logits.argmax(1) == y).double().mean()),
        "loss": float(F.cross_entropy(logits, y)),
    }


def linear_probe(
    cfg: ModelConfig, labels: Sequence[str], vocab_size: int, train: TokenizedDataset, test: TokenizedDataset
) -> dict[str, float]:
    """The probe (C = 1) fitted on every train row, scored on the test rows."""
    x_train, x_test = frozen_features(cfg, labels, vocab_size, train, test)
    head = logistic_regression(x_train, train.labels, len(labels))
    return {**score(head, x_test, test.labels), "rows": float(len(train))}
