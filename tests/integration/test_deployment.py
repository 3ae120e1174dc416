"""Deployment: certificates and node keys, the commands fedlora builds for Flower, bounded stops and
node waits; then real federations on 127.0.0.1 (SuperLink + SuperNodes + ClientApp processes)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.app import ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from fedlora.client import cli as client_cli
from fedlora.client import daemon
from fedlora.client.daemon import SuperNodeOptions, exit_reason, supernode_command
from fedlora.client.ledger import STATISTICS_ROUND, PrivacyLedger
from fedlora.common.config import load_config
from fedlora.common.devcerts import make_dev_certs
from fedlora.common.errors import ConfigError, FedloraError
from fedlora.common.launch import config_pairs, start_child, stop_child
from fedlora.common.tracking import STORE_FOLDER
from fedlora.server import deploy, strategy
from fedlora.server.strategy import build_strategy
from helpers.deploy import Federation, free_port, make_federation, wait_for, write_csv


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_dev_certs_sign_a_server_certificate_for_this_machine(tmp_path) -> None:
    certs = make_dev_certs(tmp_path)
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    assert certs.server_key.stat().st_mode & 0o077 == 0
    with pytest.raises(FedloraError, match="already exists"):
        make_dev_certs(tmp_path)


def test_node_keys_are_p384_openssh_and_never_replaced(tmp_path, capsys) -> None:
    config = write_yaml(tmp_path / "inst.yaml", {"security": {"node_private_key": "keys/node.key"}})
    assert client_cli.main(["keys", str(config)]) == 0
    private = load_ssh_private_key((tmp_path / "keys/node.key").read_bytes(), password=None)
    public = load_ssh_public_key((tmp_path / "keys/node.key.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert public.public_numbers() == private.public_key().public_numbers()
    before = (tmp_path / "keys/node.key").read_bytes()
    assert client_cli.main(["keys", str(config)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "keys/node.key").read_bytes() == before
    assert client_cli.main(["keys", str(write_yaml(tmp_path / "none.yaml", {}))]) == 2


def test_supernode_gets_tls_its_key_and_only_the_institution_yaml(tmp_path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    config = write_yaml(
        tmp_path / "inst.yaml",
        {
            "federation": {"superlink_address": "10.0.0.1:9999"},
            "security": {"ca_cert": "ca.crt", "node_private_key": "node.key"},
        },
    )
    cfg = load_config(config)
    with pytest.raises(ConfigError, match="fedlora-client keys"):
        supernode_command(cfg, config, SuperNodeOptions())
    (tmp_path / "node.key").write_text("x")
    cmd = supernode_command(cfg, config, SuperNodeOptions(runtime_port=9111))
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert flags["--superlink"] == "10.0.0.1:9999"
    assert flags["--root-certificates"] == str(tmp_path / "ca.crt")
    assert flags["--auth-supernode-private-key"] == str(tmp_path / "node.key")
    assert flags["--node-config"] == f"config='{config.resolve()}'"
    assert flags["--port"] == "9111"
    insecure = supernode_command(cfg, config, SuperNodeOptions(insecure=True, max_wait_time=5))
    assert "--insecure" in insecure and "--auth-supernode-private-key" not in insecure
    assert insecure[-2:] == ["--max-wait-time", "5"]


def test_superlink_is_secured_unless_told_otherwise(tmp_path) -> None:
    config = write_yaml(
        tmp_path / "coord.yaml",
        {"security": {"ca_cert": "ca.crt", "server_cert": "server.pem", "server_key": "server.key"}},
    )
    cfg = load_config(config)
    folder = deploy.RunFolder(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"security\.ca_cert"):
        deploy.superlink_command(cfg, folder, insecure=False, port=9100)
    for name in ("ca.crt", "server.pem", "server.key"):
        (tmp_path / name).write_text("x")
    cmd = deploy.superlink_command(cfg, folder, insecure=False, port=9100)
    assert {"--enable-supernode-auth", "--disable-runtime-dependency-installation"} <= set(cmd)
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(tmp_path / "server.pem")
    assert cmd[cmd.index("--database") + 1] == str(folder.work / "state.db")
    insecure = deploy.superlink_command(cfg, folder, insecure=True, port=9100)
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    with pytest.raises(ConfigError, match="no institution is admitted"):
        deploy.admitted_keys(cfg)


def test_flower_configs_and_addresses(tmp_path) -> None:
    assert config_pairs({"config": "/a b/c.yaml", "run-dir": "/r"}) == "config='/a b/c.yaml' run-dir='/r'"
    with pytest.raises(FedloraError, match="quote"):
        config_pairs({"config": "/it's.yaml"})
    assert deploy.reachable_address("0.0.0.0:9092") == "127.0.0.1:9092"
    assert deploy.split_address("[::1]:9092") == ("::1", 9092)
    with pytest.raises(ConfigError, match="host:port"):
        deploy.split_address("localhost")
    assert (deploy.find_app_dir() / "pyproject.toml").is_file()
    with pytest.raises(FedloraError, match="--app"):
        deploy.find_app_dir(tmp_path)


def test_stop_is_bounded_even_when_sigterm_is_ignored() -> None:
    stubborn = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)']); print('ready', flush=True); "
        "time.sleep(60)"
    )
    proc = start_child([sys.executable, "-c", stubborn], env={})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    began = time.monotonic()
    assert stop_child(proc, grace=1.0) == -9
    assert time.monotonic() - began < 10


def test_supernode_exit_reason_is_flowers_explanation() -> None:
    lines = [
        "INFO: starting",
        "\x1b[91mERROR \x1b[0m:     Exit Code: 305",
        "Failed to initialize the connection to the SuperLink.",
        "[code: 2004] Failed to activate SuperNode.",
        "",
        "For more information, visit: <https://flower.ai>",
        "Traceback of a SuperExec that outlived it",
    ]
    assert exit_reason(lines) == (
        "Failed to initialize the connection to the SuperLink; [code: 2004] Failed to activate SuperNode "
        "(Flower exit code 305)"
    )
    assert exit_reason(["last words"]) == "last words"


REFUSING_SUPERNODE = """
import sys
from pathlib import Path
count = Path(sys.argv[1])
n = int(count.read_text()) if count.exists() else 0
count.write_text(str(n + 1))
if n < int(sys.argv[2]):
    print("ERROR :     Exit Code: 305")
    print("[code: 2004] Failed to activate SuperNode.")
    print("")
    sys.exit(1)
"""


def test_refused_activation_is_retried_within_patience(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(daemon, "RETRY_SECONDS", 0.05)
    script = [sys.executable, "-c", REFUSING_SUPERNODE, str(tmp_path / "count")]
    daemon.run_supernode([*script, "2"], grace=1, patience=30)  # let in at the third try
    assert (tmp_path / "count").read_text() == "3"
    (tmp_path / "count").unlink()
    with pytest.raises(FedloraError, match=r"Failed to activate SuperNode .*registered with the coordinator"):
        daemon.run_supernode([*script, "5"], grace=1, patience=0)
    assert (tmp_path / "count").read_text() == "1"
    with pytest.raises(FedloraError, match="boom"):
        daemon.run_supernode([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], 1, 30)


class FakeGrid:
    """Nodes that connect one by one, every ``every`` calls of get_node_ids."""

    def __init__(self, total: int, every: int = 1) -> None:
        self.total, self.every, self.calls = total, every, 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return list(range(1, min(self.total, self.calls // self.every) + 1))


def test_node_wait_is_bounded_and_messages_expire_with_the_round(monkeypatch) -> None:
    monkeypatch.setattr(strategy, "NODE_POLL_SECONDS", 0.01)
    for attribute in ("_run_id", "_node_id", "_task_id"):  # as inside a ServerApp process
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    cfg = load_config(
        overrides=[
            "federation.min_clients=2",
            "federation.node_wait_timeout=0.5",
            "federation.round_timeout=7",
        ]
    )
    lora = build_strategy(cfg, "fp", num_clients=2)
    arrays = ArrayRecord({"w": torch.zeros(2)})
    messages = list(lora.configure_train(1, arrays, ConfigRecord(), FakeGrid(total=2, every=3)))
    assert len(messages) == 2
    assert all(m.metadata.ttl == 7 for m in messages)
    began = time.monotonic()
    with pytest.raises(FedloraError, match=r"round 1: only 1 of the 2 nodes .*node_wait_timeout \(0\.5 s\)"):
        lora.configure_train(1, arrays, ConfigRecord(), FakeGrid(total=1))
    assert time.monotonic() - began < 5


def test_stop_and_status_without_a_superlink(tmp_path) -> None:
    assert deploy.stop(tmp_path / "run", grace=1) is None
    report = deploy.status(load_config(overrides=["federation.rounds=3"]), tmp_path / "run")
    assert report["SuperLink"] == "not running" and report["rounds done"] == "0 of 3"


class FakeRegistry:
    """What ``flwr supernode register/ls/unregister`` answer, kept in memory: keys are unique forever."""

    def __init__(self) -> None:
        self.nodes: dict[int, tuple[str, str]] = {}  # node -> (key, status)

    def __call__(self, _folder, command: str, verb: str, *args: str) -> dict:
        assert command == "supernode"
        if verb == "ls":
            nodes = [{"node-id": str(n), "status": st} for n, (_, st) in self.nodes.items()]
            return {"success": True, "nodes": nodes}
        if verb == "unregister":
            node = int(args[0])
            self.nodes[node] = (self.nodes[node][0], "unregistered")
            return {"success": True, "node-id": node}
        key = deploy.key_identity(args[0])
        if any(k == key for k, _ in self.nodes.values()):
            return {"success": False, "error-message": "[code: 23] Public key already in use."}
        self.nodes[len(self.nodes) + 1] = (key, "registered")
        return {"success": True, "node-id": len(self.nodes)}


def test_registry_follows_the_config_and_a_revoked_key_stays_out(tmp_path, monkeypatch) -> None:
    fed = make_federation(tmp_path, {"rounds": 1})
    a, b = (str(tmp_path / name / "node.key.pub") for name in ("a", "b"))
    registry = FakeRegistry()
    monkeypatch.setattr(deploy, "flwr", registry)
    folder, said = deploy.RunFolder(fed.run_dir), []
    deploy.register_nodes(folder, [a, b], said.append)
    deploy.register_nodes(folder, [a], said.append)
    assert [status for _, status in registry.nodes.values()] == ["registered", "unregistered"]
    assert said[-1] == "revoked node 2: its key is no longer in security.node_public_keys"
    with pytest.raises(FedloraError, match=r"revoked earlier \(node 2\).*fedlora-client keys"):
        deploy.register_nodes(folder, [a, b], said.append)
    folder.node_ids_file.unlink()
    with pytest.raises(FedloraError, match="does not say as which node"):
        deploy.register_nodes(folder, [a], said.append)
    (tmp_path / "a" / "node.key.pub").write_text("not a key")
    with pytest.raises(ConfigError, match="not an OpenSSH public key"):
        deploy.register_nodes(folder, [a], said.append)


# --- real processes -------------------------------------------------------------------------------


def history(fed: Federation) -> list[dict]:
    return [e for e in json.loads((fed.run_dir / "history.json").read_text()) if e["round"]]


def admitted_nodes(server_log: str) -> set[int]:
    return {int(line.rsplit(" ", 1)[1]) for line in server_log.splitlines() if " as node " in line}


def ledger(fed: Federation, name: str) -> PrivacyLedger:
    return PrivacyLedger(fed.ledger(name), 8.0, 1e-5, "prv")


def report_round_times(fed: Federation) -> None:
    """Printed for the issue note (pytest -s): wall time per round against the time spent training."""
    times = [e["time"] for e in json.loads((fed.run_dir / "history.json").read_text())]
    for entry, start, end in zip(history(fed), times, times[1:], strict=False):
        train = max(c["train-seconds"] for c in entry["clients"]) if entry["clients"] else 0.0
        print(f"round {entry['round']}: {end - start:.1f} s wall, {train:.2f} s training")


@pytest.mark.integration
def test_secured_federation_admits_only_registered_tls_nodes(tmp_path, processes, monkeypatch) -> None:
    fed = make_federation(
        tmp_path,
        {"rounds": 2, "min_clients": 2, "round_timeout": 120, "node_wait_timeout": 180},
        institutions=("a", "b", "stranger"),
        admitted=("a", "b"),
    )
    processes.start("server", [*fed.server_cmd(), "--track"])
    processes.wait_log("server", "submitted", 120)
    ports = [str(free_port()) for _ in range(4)]
    processes.start(
        "stranger", fed.client_cmd("stranger", "--activation-patience", "0", "--runtime-port", ports[0])
    )
    processes.start(
        "plaintext",
        fed.client_cmd("a", "--insecure", "--max-wait-time", "5", "--runtime-port", ports[1]),
    )
    processes.start("a", fed.client_cmd("a", "--runtime-port", ports[2]))
    processes.start("b", fed.client_cmd("b", "--runtime-port", ports[3]))

    assert processes.wait("stranger", 120) == 2
    assert "Failed to activate SuperNode" in processes.log("stranger")
    assert processes.wait("plaintext", 120) == 2
    assert "could not establish a connection" in processes.log("plaintext")
    status = subprocess.run(
        [sys.executable, "-m", "fedlora.server.cli", "status", str(fed.server_yaml)],
        env=processes.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0 and "running (pid" in status.stdout, status.stderr
    assert processes.wait("server", 360) == 0, processes.tails()

    rounds = history(fed)
    assert [e["round"] for e in rounds] == [1, 2]
    admitted = admitted_nodes(processes.log("server"))
    assert len(admitted) == 2
    assert all({c["node"] for c in e["clients"]} == admitted for e in rounds)
    assert (fed.run_dir / "adapter" / "adapter_config.json").is_file()
    report_round_times(fed)
    assert processes.terminate("a", 60) == 0 and processes.terminate("b", 60) == 0
    tracked_rounds(fed.run_dir, monkeypatch)


def tracked_rounds(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fedlora-server start --track``: MLflow's own client finds the coordinator's run in the run
    folder's store, a step per round and the exported adapter."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in to its file store
    client = mlflow.MlflowClient((run_dir / STORE_FOLDER).as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.params["federation.rounds"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "replies")] == [1, 2]
    assert "adapter" in {f.path for f in client.list_artifacts(run.info.run_id)}


@pytest.mark.integration
def test_federation_survives_a_killed_client_and_a_killed_server(tmp_path, processes) -> None:
    # The round timeout outlasts Flower's heartbeat patience (2 x 30 s): round 1 then ends when the
    # SuperLink declares the killed node unavailable, so it is offline, not stale, when it comes back.
    # Round 0 (the statistics release) is off: the faults below are timed on round 1's train message.
    fed = make_federation(
        tmp_path,
        {
            "rounds": 2,
            "min_clients": 2,
            "round_timeout": 90,
            "node_wait_timeout": 180,
            "statistics_first": False,
        },
    )
    ports = {name: str(free_port()) for name in ("a", "b")}
    processes.start("server", fed.server_cmd())
    processes.wait_log("server", "submitted", 120)
    for name in ("a", "b"):
        processes.start(name, fed.client_cmd(name, "--runtime-port", ports[name]))

    # b dies (SuperNode, SuperExec, ClientApp: kill -9) after taking round 1's message.
    processes.wait_log("b", "Receiving: train message", 180)
    processes.kill("b")

    # While round 1 waits for b, a trains and replies, is stopped (SIGTERM) and started again: its
    # ledger keeps what it spent.
    processes.wait_log("a", "Sent successfully", 180)
    # Flower 1.41 turns a stored reply into "Node Unavailable" once its node is offline: let the
    # ServerApp collect it first (it pulls every 3 s).
    time.sleep(7)
    assert processes.terminate("a", 60) == 0
    spent = ledger(fed, "a").entries
    assert len(spent) == 1 and spent[0].round == 1 and spent[0].epsilon > 0
    processes.start("a-again", fed.client_cmd("a", "--runtime-port", ports["a"]))
    assert ledger(fed, "a").entries == spent

    # Round 1 completes with a alone; then the coordinator crashes (kill -9: fedlora-server,
    # SuperLink, ServerApp), b's institution restarts it, and the coordinator is started again on
    # the same run folder: it resumes at round 2, with both institutions.
    pointer = fed.run_dir / "checkpoint" / "LATEST"
    wait_for(lambda: pointer.exists(), 240, "round 1 checkpointed", processes.tails)
    processes.kill("server")
    assert pointer.read_text() == "round-00001"
    processes.start("b-again", fed.client_cmd("b", "--runtime-port", ports["b"]))
    processes.start("server-again", fed.server_cmd())
    assert processes.wait("server-again", 360) == 0, processes.tails()
    log = processes.log("server-again")
    assert "round 2/2" in log and "round 1/2" not in log
    rounds = history(fed)
    assert [e["round"] for e in rounds] == [1, 2]
    nodes = admitted_nodes(processes.log("server"))
    assert len(rounds[0]["clients"]) == 1
    assert {c["node"] for c in rounds[1]["clients"]} == nodes
    after = ledger(fed, "a").entries
    assert after[:1] == spent and len(after) == 2 and after[1].epsilon > spent[0].epsilon
    assert (fed.run_dir / "adapter" / "adapter_config.json").is_file()
    report_round_times(fed)


@pytest.mark.integration
def test_a_key_removed_from_the_config_is_revoked_on_restart(tmp_path, processes) -> None:
    # The institutions plan their budget for 2 rounds; the coordinator first runs 1, then resumes for 2.
    fed = make_federation(
        tmp_path, {"rounds": 2, "min_clients": 2, "round_timeout": 120, "node_wait_timeout": 180}
    )
    coordinator = yaml.safe_load(fed.server_yaml.read_text())
    coordinator["federation"]["rounds"] = 1
    write_yaml(fed.server_yaml, coordinator)
    ports = {name: str(free_port()) for name in ("a", "b")}
    processes.start("server", fed.server_cmd())
    processes.wait_log("server", "submitted", 120)
    for name in ("a", "b"):
        processes.start(name, fed.client_cmd(name, "--runtime-port", ports[name]))
    assert processes.wait("server", 360) == 0, processes.tails()
    stopped = time.monotonic()
    nodes = admitted_nodes(processes.log("server"))
    assert {c["node"] for c in history(fed)[0]["clients"]} == nodes and len(nodes) == 2
    assert processes.terminate("a", 60) == 0 and processes.terminate("b", 60) == 0

    # b is revoked: its key leaves the config, and the coordinator restarts on the same folder, once
    # the nodes' last sessions stopped counting as online (2 heartbeats of 30 s after the SuperLink
    # stopped): a stale session would be refused, or sampled, whatever the registry says.
    coordinator["security"]["node_public_keys"] = [str(tmp_path / "a" / "node.key.pub")]
    coordinator["federation"].update({"rounds": 2, "min_clients": 1})
    write_yaml(fed.server_yaml, coordinator)
    time.sleep(max(0.0, stopped + 65 - time.monotonic()))
    processes.start("server-again", fed.server_cmd())
    processes.wait_log("server-again", "submitted", 120)
    processes.start(
        "b-again", fed.client_cmd("b", "--activation-patience", "0", "--runtime-port", ports["b"])
    )
    assert processes.wait("b-again", 120) == 2, processes.tails()
    assert "Failed to activate SuperNode" in processes.log("b-again")
    b_node = int(
        next(
            line for line in processes.log("server").splitlines() if "b/node.key.pub as node" in line
        ).split()[-1]
    )
    registry = deploy.registered_nodes(deploy.RunFolder(fed.run_dir))
    assert registry[b_node] == "unregistered" and set(registry) == nodes, registry
    processes.start("a-again", fed.client_cmd("a", "--runtime-port", ports["a"]))
    assert processes.wait("server-again", 360) == 0, processes.tails()

    rounds = history(fed)
    assert [e["round"] for e in rounds] == [1, 2]
    assert {c["node"] for c in rounds[1]["clients"]} == nodes - {b_node}
    assert [e.round for e in ledger(fed, "b").entries] == [STATISTICS_ROUND, 1]
    assert [e.round for e in ledger(fed, "a").entries] == [STATISTICS_ROUND, 1, 2]
    assert processes.terminate("a-again", 60) == 0


@pytest.mark.integration
def test_the_base_model_is_loaded_once_across_rounds_and_evaluations(tmp_path, processes) -> None:
    # Flower starts a new ClientApp process for every message; the institution's worker keeps the model.
    fed = make_federation(
        tmp_path,
        {
            "rounds": 3,
            "min_clients": 1,
            "fraction_evaluate": 1.0,
            "round_timeout": 120,
            "node_wait_timeout": 180,
        },
        institutions=("a",),
        admitted=("a",),
    )
    write_csv(tmp_path / "a" / "eval.csv", 16, seed=1)
    config = yaml.safe_load(fed.institutions["a"].read_text())
    config["data"]["eval_path"] = "eval.csv"
    config["privacy"]["audit_log"] = str(tmp_path / "a" / "audit.jsonl")
    write_yaml(fed.institutions["a"], config)
    processes.start("server", fed.server_cmd())
    processes.wait_log("server", "submitted", 120)
    processes.start("a", fed.client_cmd("a", "--runtime-port", str(free_port())))
    assert processes.wait("server", 360) == 0, processes.tails()

    log = processes.log("a")
    # Round 0's statistics release, then a train and an evaluate message in each of the 3 rounds.
    assert log.count("Start `flwr-clientapp` process") == 7, processes.tails(60)
    assert len([line for line in log.splitlines() if "loaded base model tiny-bert" in line]) == 1, log
    assert [e.round for e in ledger(fed, "a").entries] == [STATISTICS_ROUND, 1, 2, 3]
    audit = [json.loads(line) for line in (tmp_path / "a" / "audit.jsonl").read_text().splitlines()]
    assert [(a["type"], a["round"]) for a in audit] == [("train", STATISTICS_ROUND)] + [
        (t, r) for r in (1, 2, 3) for t in ("train", "evaluate")
    ]
    assert all("error" not in a for a in audit)
    folder = next(line for line in log.splitlines() if "listening on" in line).rsplit(" ", 1)[1]
    assert processes.terminate("a", 60) == 0
    assert not Path(folder).parent.exists()
