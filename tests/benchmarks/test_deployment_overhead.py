"""The deployment-overhead benchmark: the federation it runs is valid for both parties, and a round's
overhead is its wall time minus the training time the client reported."""

from __future__ import annotations

import json

from benchmarks import deployment_overhead as bench
from fedlora.common.config import load_config


def test_the_benchmarks_federation_is_valid_and_secured(tmp_path) -> None:
    args = bench.parser().parse_args(["--model", "tiny-llama", "--rounds", "3", "--rows", "5"])
    server_yaml, config = bench.federation(tmp_path, args)
    server = load_config(str(server_yaml), persona="coordinator")
    institution = load_config(str(config), persona="institution")
    assert server.federation.rounds == institution.federation.rounds == 3
    assert server.federation.superlink_address == institution.federation.superlink_address
    assert server.federation.fraction_evaluate == 1.0
    assert list(server.security.node_public_keys) == [str(config.parent / "node.key.pub")]
    assert (config.parent / "node.key").is_file() and institution.security.ca_cert
    assert len((config.parent / "train.jsonl").read_text().splitlines()) == 5


def test_round_overheads_from_a_history(tmp_path) -> None:
    history = [
        {"round": 0, "time": 100.0},
        {"round": 1, "time": 130.0, "clients": [{"train-seconds": 4.0}]},
        {"round": 2, "time": 150.0, "clients": [{"train-seconds": 5.0}]},
    ]
    (tmp_path / "history.json").write_text(json.dumps(history))
    assert bench.round_times(tmp_path) == [(30.0, 4.0), (20.0, 5.0)]
