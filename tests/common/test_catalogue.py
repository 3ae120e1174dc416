"""The one catalogue of names: the config offers exactly its names, and every name resolves."""

from __future__ import annotations

import dataclasses

import pytest

from fedlora.common import catalogue
from fedlora.common.config import DataConfig, FederationConfig, ModelConfig, PrivacyConfig, load_config
from fedlora.common.data import PACKAGED_TABLES
from fedlora.common.errors import ConfigError
from fedlora.server.aggregators import AGGREGATORS, create_aggregator
from fedlora.server.optimisers import OPTIMISERS


def offered(section: type, key: str) -> tuple[str, ...]:
    return next(f for f in dataclasses.fields(section) if f.name == key).metadata["choices"]


def test_the_config_offers_exactly_the_catalogues_names() -> None:
    assert offered(FederationConfig, "aggregator") == tuple(catalogue.AGGREGATORS)
    assert offered(FederationConfig, "strategy") == catalogue.SERVER_OPTIMISERS
    assert offered(ModelConfig, "variant") == catalogue.MODEL_VARIANTS == ("lora", "ffa")
    assert offered(DataConfig, "dataset") == tuple(catalogue.DATASETS)
    assert DataConfig().dataset == catalogue.DEFAULT_DATASET in catalogue.DATASETS
    assert offered(PrivacyConfig, "accountant") == catalogue.ACCOUNTANTS


def test_every_name_resolves_to_a_class_that_declares_the_catalogues_capabilities() -> None:
    assert list(AGGREGATORS) == list(catalogue.AGGREGATORS)
    for name, entry in catalogue.AGGREGATORS.items():
        cls = AGGREGATORS[name]
        assert cls.name == name and cls.entry is entry
        assert (cls.mixed_ranks, cls.mixed_scales) == (entry.mixed_ranks, entry.mixed_scales)
        options = {key: getattr(FederationConfig(), key) for key in entry.options}
        assert isinstance(create_aggregator(name, global_scale=2.0, **options), cls)
    assert set(OPTIMISERS) == set(catalogue.SERVER_OPTIMISERS)
    assert all(OPTIMISERS[name].name == name for name in catalogue.SERVER_OPTIMISERS)
    assert set(PACKAGED_TABLES) == set(catalogue.DATASETS)


def test_an_aggregator_class_outside_the_catalogue_is_refused() -> None:
    from fedlora.server.aggregators.base import Aggregator

    with pytest.raises(KeyError, match="median"):
        type("Median", (Aggregator,), {"name": "median"})


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["federation.aggregator=ffa"], "federation.aggregator: 'ffa' needs model.variant: ffa"),
        (["model.variant=ffa"], "model.variant: 'ffa' is aggregated only by federation.aggregator: ffa"),
        (["federation.error_feedback=true"], "only the 'exact' aggregator keeps residuals"),
        (["federation.aggregator=exact", "federation.strategy=fedadam"], "'exact' re-factorises every round"),
        (
            ["simulation.num_clients=2", "simulation.client_ranks=[4, 8]"],
            "mixed ranks need federation.aggregator: exact",
        ),
    ],
)
def test_cross_checks_read_the_capabilities(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config(overrides=overrides)
