"""One convention for every command: CONFIG and --set, --out, check, stdout for results and stderr
for diagnostics, one-line errors; and a first simulation that says what matters, once."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import __main__ as benchmarks
from benchmarks import aggregators, dp_throughput, memory, overhead, recipe, scale
from fedlora.client import cli as client_cli
from fedlora.common.cli_support import run_folder
from fedlora.common.devcerts import make_dev_certs
from fedlora.server import cli as server_cli
from fedlora.simulations import cli as sim_cli


def commands() -> dict[str, argparse.ArgumentParser]:
    found = {"fedlora-simulate": sim_cli.parser(), "fedlora-simulate check": sim_cli.check_parser()}
    for name, parser in (("fedlora-client", client_cli.parser()), ("fedlora-server", server_cli.parser())):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        found.update({f"{name} {command}": p for command, p in sub.choices.items()})
    for module in (aggregators, dp_throughput, memory, overhead, recipe, scale):
        found[f"benchmarks {module.__name__.rsplit('.', 1)[1]}"] = module.parser()
    return found


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[0] if a.option_strings else a.dest: a for a in parser._actions}


def test_every_command_takes_config_set_and_out_the_same_way() -> None:
    required = set()
    for name, parser in commands().items():
        if name == "fedlora-server dev-certs":
            continue  # makes certificates, reads no config
        found = options(parser)
        if name in ("fedlora-client predict", "fedlora-client export"):
            # They use what a run made: its folder (or its adapter's) comes first, in place of CONFIG.
            assert found["run"].metavar == "RUN_OR_ADAPTER" and "config" not in found, name
            continue
        config = found.get("config")
        assert config is not None, f"{name}: no CONFIG argument"
        # An optional CONFIG comes with --set; a required one is read as it is by other processes.
        assert (config.nargs == "?") == ("--set" in found), name
        if config.nargs != "?":
            required.add(name)
        assert "--run-dir" not in found, name
        if "--out" in found:
            assert found["--out"].type is Path and found["--out"].default is None, name
    handed_on = ("client start", "server start", "server status", "server stop")
    assert required == {f"fedlora-{command}" for command in handed_on}


def test_the_default_run_folder_is_fresh_and_named_after_the_config() -> None:
    assert re.fullmatch(r"runs/hospitals-\d{8}-\d{6}", str(run_folder(None, "hospitals")))
    assert run_folder(Path("mine"), "hospitals") == Path("mine")


def coordinator_yaml(tmp_path: Path, keys: list[str], name: str = "coordinator") -> Path:
    certs = make_dev_certs(tmp_path / f"certs-{name}")
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        "name: coordinator\nmodel: {source: tiny-bert}\n"
        'federation: {rounds: 3, min_clients: 2, superlink_address: "127.0.0.1:9092"}\n'
        f"security:\n  ca_cert: {certs.ca_cert}\n  server_cert: {certs.server_cert}\n"
        f"  server_key: {certs.server_key}\n  node_public_keys: [{', '.join(keys)}]\n"
    )
    return path


def test_a_coordinator_checks_its_yaml_without_starting_anything(tmp_path, capsys) -> None:
    key = tmp_path / "keys" / "hospital-a.key"
    assert client_cli.main(["keys", "--set", f"security.node_private_key={key}"]) == 0
    assert f"node key written to {key}" in " ".join(capsys.readouterr().out.split())
    config = coordinator_yaml(tmp_path, [f"{key}.pub"])
    assert server_cli.main(["check", str(config)]) == 0
    out, err = capsys.readouterr()
    assert f"{key}.pub" in out and "127.0.0.1:9092" in out and err == ""
    assert not (tmp_path / "run").exists()  # no run folder, no SuperLink

    missing = coordinator_yaml(tmp_path, [str(tmp_path / "keys" / "hospital-b.key.pub")], "missing-key")
    assert server_cli.main(["check", str(missing), "--set", "federation.rounds=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: security.node_public_keys:") and "hospital-b.key.pub" in err
    assert "\n" not in err


def test_a_researcher_checks_a_simulation_without_starting_it(capsys) -> None:
    assert sim_cli.main(["check", "--set", "model.source=tiny-bert"]) == 0
    out, err = capsys.readouterr()
    assert "5 clients, 8 rounds, tiny-bert" in out and err == ""
    assert "partition: dirichlet, 5 institutions, training rows min " in out
    assert sim_cli.main(["check", "--set", "simulation.num_clients=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "federation.min_clients: 5 exceeds simulation.num_clients 2" in err and "\n" not in err


def test_a_partition_that_cannot_be_drawn_is_refused_before_ray_starts(tmp_path, capsys) -> None:
    """Every actor would fail every message on it (and pay the failed draws again each time)."""
    import ray

    from fedlora.common.cli_support import read_config
    from fedlora.common.errors import DataError
    from fedlora.simulations.run import simulate

    many = ["model.source=tiny-bert", "simulation.num_clients=60", "simulation.dirichlet_alpha=0.01"]
    assert sim_cli.main(["check", *(a for kv in many for a in ("--set", kv))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: dirichlet partition: no draw in 100 gave each of 60 parts")
    assert "\n" not in err
    with pytest.raises(DataError, match="dirichlet partition"):
        simulate(read_config(sim_cli.default_config(), many, "simulation"), tmp_path / "run")
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


def test_benchmarks_share_one_entry_point_and_one_error_convention(capsys) -> None:
    assert benchmarks.main([]) == 2
    assert "dp_throughput" in capsys.readouterr().out
    assert benchmarks.main(["nope"]) == 2
    modules = sorted(
        p.stem for p in Path(benchmarks.__file__).parent.glob("*.py") if not p.stem.startswith("_")
    )
    modules.remove("bare_flower")  # the baseline app the overhead benchmark runs, not a benchmark
    assert sorted(benchmarks.BENCHMARKS) == modules
    assert capsys.readouterr().err.strip() == (
        f"error: nope: no such benchmark; expected one of {', '.join(benchmarks.BENCHMARKS)}"
    )
    assert benchmarks.main(["dp-throughput", "--steps", "1", "--warmup-steps", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: --warmup-steps: 2 exceeds --steps 1")
    assert benchmarks.main(["recipe", "--recipe", "lr", "--modes"]) == 2
    assert "error: --recipe 'lr': 'lr' is not key=value" in capsys.readouterr().err


@pytest.mark.integration
def test_a_first_simulation_off_a_terminal_prints_a_line_per_round_and_no_notices(tmp_path) -> None:
    rounds = 2
    sets = [
        "model.source=tiny-bert",
        "data.max_length=32",
        "training.local_steps=1",
        f"federation.rounds={rounds}",
        "federation.min_clients=2",
        "simulation.num_clients=2",
        "privacy.epsilon=100",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_DEDUP_LOGS"}
    done = subprocess.run(
        [sys.executable, "-m", "fedlora.simulations.cli", "--out", str(tmp_path / "run")]
        + [arg for s in sets for arg in ("--set", s)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("hospitals: 2 clients, 2 rounds, tiny-bert"), lines
    # Round 0 is the institutions' class statistics (statistics first), named as such.
    assert [line.split(":")[0] for line in lines[1:]] == [f"round 0/{rounds} (statistics)"] + [
        f"round {r}/{rounds}" for r in (1, 2)
    ], lines
    assert all("2 replies, 0 dropped" in line for line in lines[1:]), lines
    for notice in ("DEPRECATED", "deprecated", "Warning", "fraction_evaluate", "\x1b["):
        assert notice not in done.stderr, done.stderr
    assert done.stdout.startswith("done in ") and "report at" in done.stdout
