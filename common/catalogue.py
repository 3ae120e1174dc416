"""The names a config may choose and what each one can do, written once.

The config's choices and cross-checks (``fedlora.common.config``), the server's strategy and
aggregators (``fedlora.server``) and the data loader (``fedlora.common.data``) all read these tables,
so a new aggregator, optimiser or packaged data set is named here and nowhere else. The server's
classes are looked up by these names (``tests/common/test_catalogue.py`` checks both sides agree).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AggregatorEntry:
    """What an aggregator (``federation.aggregator``) can do and what it needs."""

    name: str
    mixed_ranks: bool
    """Clients may send LoRA factors of another rank than the global adapter's."""
    mixed_scales: bool
    """A reply at another scale than the global one is converted exactly (same product)."""
    variant: str
    """The ``model.variant`` it aggregates."""
    server_optimiser: bool
    """A server optimiser (``federation.strategy`` other than fedavg) may step its result."""
    options: tuple[str, ...] = ()
    """``federation`` keys passed to the aggregator as its own keyword options."""


AGGREGATORS: dict[str, AggregatorEntry] = {
    entry.name: entry
    for entry in (
        # A and B are averaged apart: factors at another scale are not comparable.
        AggregatorEntry(
            "fedavg", mixed_ranks=False, mixed_scales=False, variant="lora", server_optimiser=True
        ),
        # Re-factorised by SVD every round: a server optimiser on A and B would be meaningless.
        AggregatorEntry(
            "exact",
            mixed_ranks=True,
            mixed_scales=True,
            variant="lora",
            server_optimiser=False,
            options=("error_feedback",),
        ),
        AggregatorEntry("ffa", mixed_ranks=False, mixed_scales=True, variant="ffa", server_optimiser=True),
    )
}

SERVER_OPTIMISERS: tuple[str, ...] = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedprox")
"""``federation.strategy``: the server optimisers over the aggregated delta."""

MODEL_VARIANTS: tuple[str, ...] = tuple(dict.fromkeys(entry.variant for entry in AGGREGATORS.values()))
"""``model.variant``: every variant some aggregator takes, the plain one ('lora') first."""


@dataclass(frozen=True)
class DatasetEntry:
    """A packaged data set (``data.dataset``)."""

    name: str
    title: str
    """How its sources are named in errors and reports."""


DATASETS: dict[str, DatasetEntry] = {
    entry.name: entry
    for entry in (
        DatasetEntry("drug-reviews", "drug-review demo"),
        DatasetEntry("medmcqa-subjects", "MedMCQA subjects"),
        DatasetEntry("medmcqa-qa", "MedMCQA questions and answers"),
    )
}

DEFAULT_DATASET = "drug-reviews"
"""``data.dataset``'s default: the one a file of the institution's own (``data.path``) may go with."""

ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")
"""``privacy.accountant``: Opacus accountants offered ('gdp' underestimates here: not offered)."""


def aggregators_with(**capabilities: object) -> list[str]:
    """The aggregators whose entries have every given capability value, in catalogue order."""
    return [
        name
        for name, entry in AGGREGATORS.items()
        if all(getattr(entry, key) == value for key, value in capabilities.items())
    ]
