"""What a simulation on a Ray cluster checks before round 1 (issue 30), without starting Ray: the
address, the nodes' resources, the GPU share's arithmetic, and which files carry back to the driver.
The real cluster is in test_simulation_cluster.py."""

from __future__ import annotations

import socket

import pytest
import torch

from fedlora.common.config import load_config
from fedlora.common.errors import ConfigError, FedloraError
from fedlora.simulations.carry import is_own, own_files
from fedlora.simulations.cluster import hosts, require_reachable
from fedlora.simulations.gpu_share import GIB, check_share, measure_need
from fedlora.simulations.run import backend_config, prepare_run_dir


def cfg(*sets: str):
    return load_config(overrides=["model.source=tiny-bert", *sets])


def test_a_cluster_allows_more_cpus_per_institution_than_this_machine_has() -> None:
    with pytest.raises(ConfigError, match="exceeds this machine's"):
        backend_config(cfg("simulation.client_cpus=64"))
    # Without an address, a Ray of its own: never the latest cluster someone started on this machine.
    assert backend_config(cfg())["init_args"]["address"] == "local"
    joined = backend_config(cfg("simulation.client_cpus=64", "simulation.ray_address=10.0.0.1:6379"))
    assert joined["init_args"]["address"] == "10.0.0.1:6379" and "num_cpus" not in joined["init_args"]
    assert joined["client_resources"] == {"num_cpus": 64, "num_gpus": 0.0}


def test_only_nodes_with_the_resources_host_institutions() -> None:
    nodes = [{"CPU": 0.0}, {"CPU": 4.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert hosts(cfg("simulation.client_cpus=3"), nodes) == [1, 2]
    assert hosts(cfg("simulation.client_cpus=3", "simulation.client_gpus=0.25"), nodes) == [2]
    with pytest.raises(ConfigError) as refused:
        hosts(cfg("simulation.client_cpus=9"), nodes)
    said = str(refused.value)
    assert said.startswith("simulation.client_cpus 9, client_gpus 0: no node of the Ray cluster"), said
    assert "at most 8 CPUs, 1 GPUs" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="whole number of GPUs"):
        hosts(cfg("simulation.client_gpus=1.5"), nodes)


def test_gpu_share_fits_or_is_refused_with_the_share_that_would() -> None:
    check_share(0.25, 80 * GIB, 12 * GIB, "an H100")  # 20 GiB for 12: four institutions per GPU
    check_share(1.0, 16 * GIB, 16 * GIB, "a T4")
    with pytest.raises(ConfigError) as refused:
        check_share(0.25, 16 * GIB, 5 * GIB, "a T4")
    said = str(refused.value)
    assert said.startswith("simulation.client_gpus: 0.25 of a T4 (16.0 GiB) is 4.00 GiB"), said
    assert "5.00 GiB" in said
    assert "use at least 0.31" in said
    with pytest.raises(ConfigError, match="more than one GPU's memory"):
        check_share(0.5, 16 * GIB, 20 * GIB, "a T4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures on a CUDA GPU")
def test_measured_need_of_tiny_bert_fits_a_quarter_gpu() -> None:
    name, total, need = measure_need(cfg("data.max_length=32", "training.batch_size=16"))
    assert 0 < need < total / 4, (name, total, need)
    check_share(0.25, total, need, name)


def test_an_address_nothing_answers_at_is_refused_in_one_line(monkeypatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens
    with pytest.raises(FedloraError) as refused:
        require_reachable(f"127.0.0.1:{port}")
    said = str(refused.value)
    assert said.startswith(f"simulation.ray_address: cannot join the Ray cluster at '127.0.0.1:{port}'"), said
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(FedloraError, match="cannot join"):
        require_reachable("auto")
    with pytest.raises(ConfigError, match="Ray Client address"):
        require_reachable("ray://head:10001")
    with pytest.raises(ConfigError, match="not host:port"):
        require_reachable("head")


def test_a_run_folder_resumes_on_a_cluster(tmp_path) -> None:
    prepare_run_dir(cfg(), tmp_path)
    prepare_run_dir(cfg("simulation.ray_address=auto", "federation.rounds=9"), tmp_path)
    with pytest.raises(ConfigError, match="another config"):
        prepare_run_dir(cfg("simulation.ray_address=auto", "privacy.epsilon=3"), tmp_path)


def test_an_institution_carries_back_its_own_files_only(tmp_path) -> None:
    for name in ("ledgers/client-1.json", "ledgers/client-1.json.lock", "ledgers/client-10.json",
                 "audit/client-1.jsonl", "audit/client-1-errors.log", "canaries/client-1.sums.safetensors"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    assert sorted(own_files(tmp_path, 1)) == [
        "audit/client-1-errors.log", "audit/client-1.jsonl", "canaries/client-1.sums.safetensors",
        "ledgers/client-1.json",
    ]
    assert is_own("ledgers/client-1.json", 1)
    assert not is_own("ledgers/client-10.json", 1) and not is_own("ledgers/../config.yaml", 1)
    assert not is_own("checkpoint/client-1.json", 1) and not is_own("ledgers/client-1.json/x", 1)
