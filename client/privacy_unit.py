"""Person-level DP-SGD (data.privacy_unit): persons are sampled, and each contributes one clipped
gradient, so every epsilon is per person.

User-level DP-SGD with user-level sampling (Charles et al. 2024, "Fine-Tuning Large Language Models
with User-Level Differential Privacy"), built inside Opacus rather than beside it:

- sampling: Opacus' own DPDataLoader Poisson-samples persons (its dataset is the list of persons),
  so make_private derives the sample rate, 1 / ceil(persons / batch), and the expected batch in
  persons, and privacy.secure_mode's generator draws them; the collate function then takes up to
  data.max_rows_per_unit rows of each sampled person (a random subset when they have more);
- gradients: Opacus' hooks compute each row's gradient as usual; before the optimizer step,
  ``group_by_person`` replaces every parameter's ``grad_sample`` by the mean over each person's
  rows, one entry per person;
- clipping, noise, accounting: Opacus' DPOptimizer clips one vector per person, adds noise to their
  sum and divides by the expected number of persons; the ledger composes the person sample rate.

Why group gradients rather than feed Opacus per-person grouped losses: its per-sample hooks expect
one input row per sample; grouping afterwards leaves every model (classification, causal LM), its
loss and Opacus' hooks unchanged, and the canary hook, which appends per-sample gradients after it,
sees one entry per person (a canary is a person).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fedlora.common.data import TokenizedDataset


@dataclass(frozen=True)
class UnitCounts:
    """How rows spread over persons: what `fedlora-client check` shows and the recipe plans from."""

    persons: int
    rows: int
    min_rows: int
    median_rows: float
    max_rows: int
    cap: int
    capped_rows: int

    @property
    def rows_per_person(self) -> float:
        """Mean rows a sampled person contributes to a step (at most the cap each)."""
        return self.capped_rows / self.persons


def unit_counts(units: Tensor, cap: int) -> UnitCounts:
    sizes = np.bincount(np.unique(units.numpy(), return_inverse=True)[1])
    return UnitCounts(
        persons=len(sizes),
        rows=int(sizes.sum()),
        min_rows=int(sizes.min()),
        median_rows=float(np.median(sizes)),
        max_rows=int(sizes.max()),
        cap=cap,
        capped_rows=int(np.minimum(sizes, cap).sum()),
    )


class _Persons(Dataset[tuple[Tensor]]):
    """Persons by position; what Opacus' DPDataLoader samples."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, person: int) -> tuple[Tensor]:
        return (torch.tensor(person),)


class PersonRows:
    """The rows of each sampled person, at most ``cap`` of them, as one batch plus each row's owner
    (the person's position in the batch). The subset of a person with more rows than the cap is drawn
    from torch's RNG, as Opacus' sampling is (seeded only by simulation.reproducible)."""

    def __init__(self, data: TokenizedDataset, cap: int) -> None:
        if data.units is None:
            raise ValueError("PersonRows needs a dataset with units")
        order = np.argsort(data.units.numpy(), kind="stable")
        _, starts = np.unique(data.units.numpy()[order], return_index=True)
        self.rows_of = np.split(order, starts[1:])
        self.data = data
        self.cap = cap

    def __call__(self, batch: list[tuple[Tensor]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rows, owner = [], []
        for position, (person,) in enumerate(batch):
            mine = self.rows_of[int(person)]
            if len(mine) > self.cap:
                mine = mine[torch.randperm(len(mine))[: self.cap].numpy()]
            rows.append(mine)
            owner.append(np.full(len(mine), position))
        index = torch.as_tensor(np.concatenate(rows))
        d = self.data
        return (
            d.input_ids[index],
            d.attention_mask[index],
            d.labels[index],
            torch.as_tensor(np.concatenate(owner)),
        )

    def loader(self, batch_size: int) -> DataLoader:
        """Batches of ``batch_size`` persons, for Opacus to turn into Poisson sampling over persons."""
        return DataLoader(_Persons(len(self.rows_of)), batch_size=batch_size, collate_fn=self)


def group_by_person(params: Iterable[nn.Parameter], owner: Tensor) -> None:
    """Each parameter's per-row ``grad_sample`` replaced by the per-person mean of its rows: Opacus
    then clips and sums one gradient per person."""
    owner = owner.to(torch.int64)
    persons = int(owner.max()) + 1
    counts = torch.bincount(owner, minlength=persons)
    for param in params:
        rows = param.grad_sample
        means = torch.zeros((persons, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        means.index_add_(0, owner.to(rows.device), rows)
        param.grad_sample = means / counts.to(rows.device, rows.dtype).view(-1, *([1] * (rows.dim() - 1)))
