"""Simulation only: how one data set is split among virtual institutions (simulation.partition).

IID, Dirichlet label skew and by-column partitions (with persons, by-column only, and a person never
at two institutions). A real institution trains on all its own rows; the simulation hands each
virtual ClientApp its rows through ``fedlora.client.app.ClientSetup.rows``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from torch import Tensor

from fedlora.client.app import shared_data
from fedlora.common.config import FedloraConfig, SimulationConfig
from fedlora.common.data import DataBundle
from fedlora.common.errors import ConfigError, DataError

DIRICHLET_TRIES = 100


@lru_cache(maxsize=2)
def simulation_partitions(cfg: FedloraConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each virtual institution's training and evaluation rows (a pure function of the config)."""
    _, bundle = shared_data(cfg)
    evals = (
        iid_partition(len(bundle.eval), cfg.simulation.num_clients, cfg.simulation.seed)
        if (bundle.eval is not None)
        else []
    )
    return partition(bundle, cfg.simulation), evals


def iid_partition(n: int, num_parts: int, seed: int) -> list[np.ndarray]:
    """A shuffled split into parts whose sizes differ by at most one row."""
    if n < num_parts:
        raise DataError(f"iid partition: {n} rows cannot fill {num_parts} parts")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_parts)]


def dirichlet_partition(
    label_ids: np.ndarray, num_parts: int, alpha: float, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Label skew: each label's rows are shared out by Dirichlet(alpha) proportions.

    Smaller alpha gives each part fewer labels. Draws repeat (same seed, same result) until every
    part holds at least ``min_size`` rows, because an empty client cannot train.
    """
    label_ids = np.asarray(label_ids)
    n = len(label_ids)
    if n < num_parts * min_size:
        raise DataError(f"dirichlet partition: {n} rows cannot give {num_parts} parts {min_size} rows each")
    rng = np.random.default_rng(seed)
    by_label = [np.flatnonzero(label_ids == label) for label in np.unique(label_ids)]
    for _ in range(DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
        for rows in by_label:
            shuffled = rng.permutation(rows)
            shares = rng.dirichlet(np.full(num_parts, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for part, piece in zip(parts, np.split(shuffled, cuts), strict=True):
                part.append(piece)
        result = [np.sort(np.concatenate(part)) for part in parts]
        if min(len(part) for part in result) >= min_size:
            return result
    raise DataError(
        f"dirichlet partition: no draw in {DIRICHLET_TRIES} gave each of {num_parts} parts "
        f"at least {min_size} rows (raise simulation.dirichlet_alpha or lower "
        "simulation.num_clients)"
    )


def column_partition(groups: np.ndarray) -> list[np.ndarray]:
    """One part per distinct value (an institution column), in sorted order of the values."""
    values, inverse = np.unique(np.asarray(groups), return_inverse=True)
    return [np.flatnonzero(inverse == i) for i in range(len(values))]


def partition(bundle: DataBundle, sim: SimulationConfig) -> list[np.ndarray]:
    """Row indices of ``bundle.train`` for each of ``sim.num_clients`` virtual institutions."""
    if bundle.train.units is not None and sim.partition != "column":
        raise ConfigError(
            f"simulation.partition: '{sim.partition}' splits rows, so one person's rows could land at two "
            "institutions; with data.privacy_unit use 'column' (each person inside one institution)"
        )
    if sim.partition == "iid":
        return iid_partition(len(bundle.train), sim.num_clients, sim.seed)
    if sim.partition == "dirichlet":
        if bundle.train_label_ids is None:
            raise DataError(
                "simulation.partition: 'dirichlet' needs class labels (model.task "
                "classification); use 'iid' or 'column'"
            )
        return dirichlet_partition(bundle.train_label_ids, sim.num_clients, sim.dirichlet_alpha, sim.seed)
    if bundle.train_groups is None:
        name = sim.partition_column
        problem = "is not set" if name is None else f"'{name}' is not a column of the training data"
        raise DataError(
            f"simulation.partition_column: {problem} (the 'column' partition needs a column "
            "naming each row's institution)"
        )
    parts = column_partition(bundle.train_groups)
    if bundle.train.units is not None:
        _no_person_split(bundle.train.units, bundle.train_groups, sim.partition_column)
    if len(parts) != sim.num_clients:
        raise DataError(
            f"simulation.partition_column: '{sim.partition_column}' has {len(parts)} distinct "
            f"values but simulation.num_clients is {sim.num_clients} (expected them equal)"
        )
    return parts


def _no_person_split(units: Tensor, groups: np.ndarray, column: str | None) -> None:
    """Each person's rows inside one institution: split, each part would spend its own epsilon on
    the same person, and no ledger would see the sum. Refused naming rows, not the person's id."""
    _, institution = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    codes = units.numpy()
    first: dict[int, int] = {}
    for row, (person, place) in enumerate(zip(codes.tolist(), institution.tolist(), strict=True)):
        seen = first.setdefault(person, row)
        if institution[seen] != place:
            raise DataError(
                f"data.privacy_unit: rows {seen + 1} and {row + 1} are the same person at two institutions "
                f"(simulation.partition_column '{column}'); a person must stay inside one institution"
            )
