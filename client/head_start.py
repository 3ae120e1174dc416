"""A head that starts from the institution's own data, privately: noisy class means.

Label-name heads can start below the majority class; a linear model on good features is a strong
DP baseline (Tramer & Boneh 2021), and a probe before fine-tuning distorts the features less (Kumar
et al. 2022). Each row adds its L2-normalised pooled embedding to its class's sum and 1 to its
class's count, so adding or removing a row moves the released vector by at most sqrt(2): one
Gaussian mechanism of noise std sigma * sqrt(2), which is exactly one DP-SGD step at sample rate 1
and noise multiplier sigma. The ledger records it as that (round HEAD_START_ROUND) before a row is
read, and Opacus composes it with the rounds. The head is post-processing of the release: rows
head_scale x the normalised noisy sums (a cosine head, as the label-name start), biases the log of
the noisy class shares.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fedlora.client.ledger import HEAD_START_ROUND, LedgerEntry, PrivacyLedger
from fedlora.client.recipe import HEAD_START_SENSITIVITY
from fedlora.common.adapter import adapter_state, load_adapter_state, peft_module
from fedlora.common.data import TokenizedDataset
from fedlora.common.model import HEAD
from fedlora.common.scoring import trim


def head_rows(model: nn.Module) -> int:
    """The labels of a classification head (its output rows); 0 for a model without one."""
    head = getattr(peft_module(model).base_model.model, HEAD, None)
    return head.original_module.out_features if head is not None else 0


@torch.no_grad()
def class_sums(
    model: nn.Module, data: TokenizedDataset, shape: torch.Size, device: torch.device, batch_size: int
) -> tuple[Tensor, Tensor]:
    """Per class: the sum of the rows' unit-norm pooled embeddings (``shape``: classes x width), and
    the row count."""
    classifier = peft_module(model).base_model.model
    was_training = classifier.training
    classifier.eval()
    sums = torch.zeros(shape, dtype=torch.float64)
    counts = torch.zeros(shape[0], dtype=torch.float64)
    for batch in DataLoader(data, batch_size=batch_size):
        ids, mask, labels = (t.to(device) for t in trim(batch))
        unit = nn.functional.normalize(classifier.embed(ids, mask), dim=-1).to("cpu", torch.float64)
        sums.index_add_(0, labels.cpu(), unit)
        counts += torch.bincount(labels.cpu(), minlength=shape[0]).to(torch.float64)
    classifier.train(was_training)
    return sums, counts


def noisy_head(sums: Tensor, counts: Tensor, noise_std: float, head_scale: float) -> tuple[Tensor, Tensor]:
    """The Gaussian mechanism, then post-processing into a cosine head's weight and bias."""
    noisy_sums = sums + noise_std * torch.randn(sums.shape, dtype=sums.dtype)
    noisy_counts = (counts + noise_std * torch.randn(counts.shape, dtype=counts.dtype)).clamp(min=1.0)
    weight = head_scale * nn.functional.normalize(noisy_sums, dim=-1)
    bias = torch.log(noisy_counts / noisy_counts.sum())
    return weight.float(), bias.float()


def start_head(
    model: nn.Module,
    data: TokenizedDataset,
    ledger: PrivacyLedger,
    noise_multiplier: float,
    head_scale: float,
    device: torch.device,
    batch_size: int,
) -> LedgerEntry:
    """Charge the release in the ledger (BudgetExceeded: nothing read), then set the head from it."""
    entry = ledger.reserve(HEAD_START_ROUND, 1.0, 1, noise_multiplier=noise_multiplier)
    head = {k: v for k, v in adapter_state(model).items() if f".{HEAD}." in k}
    weight_key = next(k for k in head if k.endswith(".weight"))
    bias_key = next(k for k in head if k.endswith(".bias"))
    sums, counts = class_sums(model, data, head[weight_key].shape, device, batch_size)
    weight, bias = noisy_head(sums, counts, noise_multiplier * HEAD_START_SENSITIVITY, head_scale)
    load_adapter_state(model, {weight_key: weight, bias_key: bias})
    return entry
