"""Synthetic patients for the drug reviews, which carry no person id: data with many rows per person
for measuring person-level DP (data.privacy_unit), the same for every run with the same seed.

Each condition's reviews are shuffled and cut into patients of 1 to LARGEST reviews, sizes drawn
with probability proportional to k^-EXPONENT (skewed: most patients write one or two reviews, a few
write many); a patient reviews for one condition only. The first patient of the most frequent
condition writes LARGEST reviews, so the heaviest person the group-privacy comparison needs exists.
Synthetic grouping, not real patients: the reviews of one patient are not otherwise related.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedlora.common.config import DataConfig
from fedlora.common.data import demo_tables

LARGEST = 20
EXPONENT = 1.5
COLUMN = "patient"


def patient_ids(conditions: Sequence[str] | np.ndarray, seed: int = 0, largest: int = LARGEST) -> np.ndarray:
    """Each row's synthetic patient (an integer), given each row's condition."""
    rng = np.random.default_rng(seed)
    conditions = np.asarray(conditions).astype(str)
    sizes = np.arange(1, largest + 1)
    weights = sizes.astype(float) ** -EXPONENT
    weights /= weights.sum()
    values, counts = np.unique(conditions, return_counts=True)
    ranked = sorted(zip(values.tolist(), counts.tolist(), strict=True), key=lambda vc: (-vc[1], vc[0]))
    ids = np.empty(len(conditions), dtype=np.int64)
    patient = 0
    for rank, (value, _) in enumerate(ranked):
        rows = rng.permutation(np.flatnonzero(conditions == value))
        start = 0
        while start < len(rows):
            size = largest if rank == 0 and start == 0 else int(rng.choice(sizes, p=weights))
            ids[rows[start : start + size]] = patient
            patient += 1
            start += size
    return ids


def write_drug_reviews_with_patients(data: DataConfig, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """The packaged drug reviews (``data.demo_task``) as train and test CSV files in ``folder``, the
    training rows with a COLUMN of synthetic patients; use them as data.path and data.eval_path."""
    train, test = demo_tables(data)
    train = train.assign(**{COLUMN: [f"patient-{i}" for i in patient_ids(train["condition"], seed)]})
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.csv", folder / "test.csv"
    for frame, path in zip((train, test), paths, strict=True):
        pd.DataFrame(frame).to_csv(path, index=False)
    return paths
