"""Round 0, statistics first: this institution's class statistics of its frozen features, released
once under DP for the server to sum into the shared head (server.statistics_head).

A linear model on good features is a strong DP baseline (Tramer & Boneh 2021), and a probe before
fine-tuning distorts the features less (Kumar et al. 2022). Each row adds its L2-normalised pooled
embedding to its class's sum and 1 to its class's count, so adding or removing a row moves the
released vector by at most sqrt(2): one Gaussian mechanism of noise std sigma * sqrt(2), which is
exactly one DP-SGD step at sample rate 1 and noise multiplier sigma. The ledger records it as that
(round STATISTICS_ROUND) before a row is read, and Opacus composes it with the rounds. The noise is
the planner's (client.recipe: its share of the budget, or all of it when DP-SGD would add nothing).

Per person (data.privacy_unit under DP), the same mechanism protects a person: each row is weighted
1 / n_p, n_p the rows of its person p (``person_weights``), so the release holds each person's rows
averaged. Adding or removing p moves the sums by the matrix whose row c is sum over p's rows of class c
of u_r / n_p, of Frobenius norm at most sum_r |u_r| / n_p = 1 (triangle inequality, unit rows u_r),
and the counts by the vector of p's class shares n_pc / n_p, of L2 norm at most its L1 norm, 1; no
other person's weight changes. So one person moves the release by at most sqrt(1 + 1) = sqrt(2), as
one row does (equality: every row of p in one class with the same embedding): the ledger entry, in
the ledger's person unit, is the same one DP-SGD step at sample rate 1. The counts released are then
persons, fractionally per class (a person with rows in two classes counts n_pc / n_p in each).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from opacus.optimizers.optimizer import _generate_noise
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fedlora.client.ledger import STATISTICS_ROUND, LedgerEntry, PrivacyLedger
from fedlora.client.recipe import Recipe
from fedlora.common.adapter import peft_module
from fedlora.common.data import TokenizedDataset
from fedlora.common.distributed_noise import NoiseSharing
from fedlora.common.errors import ConfigError
from fedlora.common.model import HEAD
from fedlora.common.protocol import STATISTICS_SENSITIVITY
from fedlora.common.scoring import trim


def head_rows(model: nn.Module) -> int:
    """The labels of a classification head (its output rows); 0 for a model without one."""
    head = getattr(peft_module(model).base_model.model, HEAD, None)
    return head.original_module.out_features if head is not None else 0


def person_weights(units: Tensor) -> Tensor:
    """Each row's weight 1 / (its person's rows): a person's weights sum to 1 (see the module's bound)."""
    _, owner, sizes = torch.unique(units, return_inverse=True, return_counts=True)
    return 1.0 / sizes[owner].to(torch.float64)


def head_values(model: nn.Module) -> int:
    """The trained values of the classification head (weight and bias); 0 for a model without one."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and f".{HEAD}." in n)


@torch.no_grad()
def pooled_features(
    model: nn.Module, data: TokenizedDataset, device: torch.device, batch_size: int
) -> tuple[Tensor, Tensor]:
    """Every row's pooled embedding as the head sees it (fp32, on the CPU), and its label."""
    classifier = peft_module(model).base_model.model
    was_training = classifier.training
    classifier.eval()
    features, labels = [], []
    for batch in DataLoader(data, batch_size=batch_size):
        ids, mask, label = (t.to(device) for t in trim(batch))
        features.append(classifier.embed(ids, mask).to("cpu", torch.float32))
        labels.append(label.cpu())
    classifier.train(was_training)
    if not features:
        raise ConfigError("statistics: this institution has no training rows to release statistics of")
    return torch.cat(features), torch.cat(labels)


def class_sums(
    model: nn.Module,
    data: TokenizedDataset,
    classes: int,
    device: torch.device,
    batch_size: int,
    units: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per class: the sum of the rows' unit-norm pooled embeddings (classes x width), and the count;
    with ``units`` (each row's person), each row weighted 1 / its person's rows (``person_weights``)."""
    features, labels = pooled_features(model, data, device, batch_size)
    unit = nn.functional.normalize(features.to(torch.float64), dim=-1)
    weights = person_weights(units) if units is not None else torch.ones(len(labels), dtype=torch.float64)
    sums = torch.zeros(classes, unit.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels, unit * weights[:, None])
    counts = torch.zeros(classes, dtype=torch.float64).index_add_(0, labels, weights)
    return sums, counts


def noisy(value: Tensor, noise_std: float, generator: torch.Generator | None = None) -> Tensor:
    """``value`` plus Gaussian noise of std ``noise_std`` (0: exact), drawn as Opacus draws DP-SGD's
    noise: with ``generator`` (privacy.secure_mode: Opacus' torchcsprng device generator over
    /dev/urandom), its secure mode (four draws per value, robust to the floating-point attacks), else
    torch's default generator (experiments only)."""
    return value + _generate_noise(noise_std, value, generator, secure_mode=generator is not None)


def gaussian_release(
    sums: Tensor, counts: Tensor, noise_std: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """The Gaussian mechanism on the sums and counts together (noise 0: the exact statistics),
    each value's noise drawn by ``noisy``."""
    return noisy(sums, noise_std, generator), noisy(counts, noise_std, generator)


def release_statistics(
    model: nn.Module,
    data: TokenizedDataset,
    recipe: Recipe,
    ledger: PrivacyLedger | None,
    device: torch.device,
    batch_size: int,
    rounds: int,
    generator: torch.Generator | None = None,
    sharing: NoiseSharing | None = None,
    units: Tensor | None = None,
) -> tuple[Tensor, Tensor, float, LedgerEntry | None]:
    """Charge the release in the ledger first (BudgetExceeded: nothing read), then release. The
    ledger's noise for the ``rounds`` after it is calibrated first, so that the release and every
    planned step together spend the budget. Without a ledger (privacy off, a non-private baseline)
    the exact statistics leave. ``generator``: the secure one of privacy.secure_mode. ``sharing``
    (secure aggregation): the round's agreed noise, raised to the planner's if below it (the
    coordinator cannot lower this institution's noise), is the sum's; this release adds only its share
    (common.distributed_noise) and the ledger records both epsilons at it. An agreed noise above the
    plan spends less than planned; the rounds keep the noise calibrated for the plan, so the
    institution ends below its budget. Without a ledger the share is still added, so that the sum
    covers the peers that planned DP. ``units``: each row's person when the ledger's unit is the
    person (data.privacy_unit), whose rows are then averaged so that the entry's sensitivity holds
    per person. Returns the noisy sums and counts, the noise std and the entry."""
    if recipe.statistics_noise.value is None and ledger is not None:
        raise ConfigError(f"statistics: no release planned ({recipe.statistics_noise.reason})")
    entry = None
    noise_std = 0.0
    if ledger is not None:
        sigma = recipe.statistics_noise.value
        if sharing is not None:
            sharing = replace(sharing, sigma=max(sigma, sharing.sigma))
            sigma = sharing.sigma
        ledger.calibrate(*recipe.calibration(rounds))
        entry = ledger.reserve(STATISTICS_ROUND, 1.0, 1, noise_multiplier=sigma, sharing=sharing)
        noise_std = sharing.share_std if sharing is not None else sigma * STATISTICS_SENSITIVITY
    elif sharing is not None:
        noise_std = sharing.share_std
    sums, counts = class_sums(model, data, head_rows(model), device, batch_size, units)
    noisy_sums, noisy_counts = gaussian_release(sums, counts, noise_std, generator)
    return noisy_sums.float(), noisy_counts.float(), noise_std, entry
