"""The coordinator's held-out data in two disjoint parts, and the round chosen on one of them.

The validation part chooses which round's global adapter is exported (round 0, the adapter nobody
trained, included: the export is never worse than the start on validation). The final test part is
scored every round for the plot and the report, and never used to choose: a round picked on the test
set would overstate what the model scores on rows it has not seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedlora.common.data import ChoiceSet, TokenizedDataset
from fedlora.common.errors import ConfigError
from fedlora.common.scoring import MACRO_F1

VALIDATION = "validation"
"""A history entry's validation scores; its ``central`` scores are the final test's."""
SELECTION = ((MACRO_F1, 1.0), ("accuracy", 1.0), ("perplexity", -1.0))
"""What rounds are compared on, the first a validation score carries, with its sign (higher is
better): macro-F1 for classification (a round that collapses onto the majority class loses even when
its accuracy rises), multiple-choice accuracy, else the responses' perplexity."""


def _row_hash(data: TokenizedDataset, i: int) -> str:
    tokens = data.input_ids[i][data.attention_mask[i].bool()]
    return hashlib.sha256(tokens.numpy().astype(np.int64).tobytes()).hexdigest()


def split_held_out(data: TokenizedDataset, share: float) -> tuple[TokenizedDataset | None, TokenizedDataset]:
    """Validation and final test: per class (classification; all rows as one group otherwise) the
    lowest-ranked ``share`` of rows by a hash of their tokens is validation, and a row whose tokens
    equal a validation row's goes with it, so the parts are disjoint in content too. A pure function
    of the rows: a resumed run splits alike. ``share`` 0: no validation part."""
    if share == 0:
        return None, data
    hashes = np.array([_row_hash(data, i) for i in range(len(data))])
    groups = data.labels.numpy() if data.labels.dim() == 1 else np.zeros(len(data), dtype=np.int64)
    chosen = np.zeros(len(data), dtype=bool)
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        ranked = rows[np.argsort(hashes[rows], kind="stable")]
        chosen[ranked[: round(len(rows) * share)]] = True
    chosen |= np.isin(hashes, hashes[chosen])
    validation, test = np.flatnonzero(chosen), np.flatnonzero(~chosen)
    if not len(validation) or not len(test):
        empty = "validation" if not len(validation) else "test"
        raise ConfigError(
            f"federation.validation_share: {share:g} leaves the {len(data)} held-out rows no {empty} row "
            "(choose a share that gives both parts rows, or 0 for no validation)"
        )
    return _subset(data, validation), _subset(data, test)


def _subset(data: TokenizedDataset, rows: np.ndarray) -> TokenizedDataset:
    """The rows with their multiple-choice questions (row i is question i), renumbered."""
    part = data.subset(rows)
    if data.choices is None:
        return part
    choices = data.choices
    keep = torch.isin(choices.question, torch.as_tensor(rows))
    renumber = torch.full((len(choices.answers),), -1, dtype=torch.int64)
    renumber[torch.as_tensor(rows)] = torch.arange(len(rows))
    subset = ChoiceSet(
        rows=choices.rows.subset(np.flatnonzero(keep.numpy())),
        question=renumber[choices.question[keep]],
        answers=choices.answers[torch.as_tensor(rows)],
        chars=choices.chars[keep],
    )
    return TokenizedDataset(part.input_ids, part.attention_mask, part.labels, part.units, subset)


def selection(scores: Mapping[str, float]) -> tuple[str, float] | None:
    """The score a round is chosen on and its value (as measured), None if it carries none."""
    return next(((key, float(scores[key])) for key, _ in SELECTION if key in scores), None)


def best_round(history: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The history entry with the best validation score, the earliest on a tie; None when no round
    was scored on validation (no held-out data, or federation.validation_share 0)."""
    best: tuple[float, Mapping[str, Any]] | None = None
    for entry in history:
        chosen = selection(entry.get(VALIDATION) or {})
        if chosen is None:
            continue
        sign = dict(SELECTION)[chosen[0]]
        if best is None or sign * chosen[1] > best[0]:
            best = (sign * chosen[1], entry)
    return best[1] if best is not None else None


def exported_round(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Which round's adapter a run exports and why: the best on validation, else the last round."""
    best = best_round(history)
    if best is None:
        last = max((int(e["round"]) for e in history), default=0)
        return {"round": last, "chosen_by": "the last round (no validation scores)"}
    key, value = selection(best[VALIDATION]) or ("", 0.0)
    return {"round": int(best["round"]), "chosen_by": f"the best validation {key} ({value:.4f})"}
