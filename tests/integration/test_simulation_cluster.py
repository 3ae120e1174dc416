"""A simulation on a real multi-node Ray cluster on this machine (issue 30): a head node with no CPUs
for institutions and a worker node with 4 (more than this machine has), each a separate ``ray start``
process, so every virtual institution runs on the worker node; what they write reaches the driver's
run folder through the driver-node keeper (carry), never by writing into it; --audit reads it there
and --compare runs on the driver after the federation. A third node whose mount namespace hides the
data folder is refused in one line before round 1. Every process stops.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedlora.client.ledger import PrivacyLedger
from fedlora.common.accounting import compose
from fedlora.common.config import load_config
from fedlora.common.errors import ConfigError
from fedlora.server.checkpoint import load_checkpoint
from fedlora.simulations import cli as sim_cli
from fedlora.simulations import run as sim_run
from fedlora.simulations.compare import SETTINGS as COMPARED

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
SETS = [
    "model.source=tiny-bert",
    "data.max_length=32",
    "training.local_steps=2",
    "training.batch_size=16",
    "privacy.epsilon=100",
    "federation.min_clients=2",
    "federation.fraction_evaluate=0",
    "simulation.num_clients=2",
    "simulation.partition=iid",
    "simulation.client_cpus=3",  # above this machine's 2 CPUs: the worker node offers 4
    "privacy.planned_rounds=2",
    "simulation.reproducible=true",  # the audit's noise checks give one verdict in every run
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_flags() -> list[str]:
    """Ports of our own: other Ray clusters may run on this machine."""
    return [
        "--block",
        "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


class Cluster:
    """``ray start --block`` processes, each in its own process group, and all they started."""

    def __init__(self) -> None:
        self.nodes: list[subprocess.Popen] = []
        self.seen: set[int] = set()
        self.address = f"127.0.0.1:{free_port()}"

    def start(self, args: list[str], prefix: list[str] | None = None) -> subprocess.Popen:
        env = {**os.environ, "RAY_ADDRESS": ""}
        proc = subprocess.Popen(
            [*(prefix or []), *RAY, "start", *args, *node_flags()],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.nodes.append(proc)
        return proc

    def wait_for(self, count: int, seconds: float = 90) -> list[dict]:
        import ray

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.remember()
            try:
                ray.init(address=self.address, log_to_driver=False, logging_level="WARNING")
                nodes = [n for n in ray.nodes() if n["Alive"]]
            except (ConnectionError, RuntimeError):
                nodes = []
            finally:
                ray.shutdown()
            if len(nodes) >= count:
                return nodes
            time.sleep(1)
        raise TimeoutError(f"{count} Ray nodes did not come up")

    def remember(self) -> None:
        for proc in self.nodes:
            try:
                self.seen |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.Error:
                continue

    def stop(self, proc: subprocess.Popen) -> None:
        self.remember()
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop_all(self) -> list[int]:
        """Stop every node; the ids of any process they started that is still alive (none expected)."""
        for proc in reversed(self.nodes):
            self.stop(proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            left = [pid for pid in self.seen if psutil.pid_exists(pid) and not _zombie(pid)]
            if not left:
                return []
            time.sleep(0.5)
        for pid in left:  # report them, and do not leave them behind either
            with __import__("contextlib").suppress(psutil.Error):
                psutil.Process(pid).kill()
        return left


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def can_hide_folders() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-m", "true"]).returncode == 0


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data file the driver reads and the worker node cannot see (its folder hidden there)."""
    folder = tmp_path_factory.mktemp("hidden")
    rows = [{"text": f"note {i} {'fever' if i % 2 else 'cough'}", "label": "ab"[i % 2]} for i in range(40)]
    (folder / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "notes.jsonl"


@pytest.fixture(scope="module")
def cluster(data_file: Path):
    """A head node (no CPUs for institutions) and a worker node with 4 CPUs, whose mount namespace
    hides ``data_file``'s folder where this machine allows mount namespaces."""
    nodes = Cluster()
    port = nodes.address.rsplit(":", 1)[1]
    nodes.start(["--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                 f"--ray-client-server-port={free_port()}"])
    hide = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs none {data_file.parent} && exec "$0" "$@"']
    nodes.start([f"--address={nodes.address}", "--num-cpus=4"], prefix=hide if can_hide_folders() else None)
    try:
        nodes.wait_for(2)
        yield nodes
    finally:
        assert nodes.stop_all() == [], "Ray processes left running"


def test_federation_on_the_worker_node_fills_the_driver_run_folder(cluster: Cluster, tmp_path, capsys):
    run_dir = tmp_path / "run"
    sets = [a for s in [*SETS, "federation.rounds=2"] for a in ("--set", s)]
    audit = ["--audit", "--white-box-canaries", "50", "--black-box-canaries", "0"]
    compare = ["--compare"]  # on the driver, after the federation: its data, its own ledgers
    code = sim_cli.main(["--out", str(run_dir), "--ray-address", cluster.address, *sets, *audit, *compare])
    assert code == 0, capsys.readouterr()

    cfg = load_config(overrides=SETS)
    ledgers = sorted((run_dir / "ledgers").glob("client-*.json"))
    assert [p.name for p in ledgers] == ["client-0.json", "client-1.json"]
    for path in ledgers:
        # Each message ran in a fresh scratch folder on the worker: round 2's reservation composed
        # on the entries carried back to the run folder in rounds 0 and 1, and back in from it.
        ledger = PrivacyLedger(path, cfg.privacy.epsilon, cfg.privacy.delta, cfg.privacy.accountant)
        assert [e.round for e in ledger.entries] == [0, 1, 2]  # statistics, then both rounds
        history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries]
        assert 0 < ledger.spent <= cfg.privacy.epsilon
        assert ledger.spent == pytest.approx(compose(cfg.privacy.accountant, history, cfg.privacy.delta))
    for pid in (0, 1):
        lines = [json.loads(x) for x in (run_dir / "audit" / f"client-{pid}.jsonl").read_text().splitlines()]
        assert sorted(x["round"] for x in lines if "arrays" in x and x["round"] > 0) == [1, 2]
        assert (run_dir / "canaries" / f"client-{pid}.sums.safetensors").exists()
    audits = json.loads((run_dir / "privacy-audit.json").read_text())
    assert len(audits) == 2, audits
    assert load_checkpoint(run_dir / "checkpoint").round == 2
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["round"] for e in history] == [0, 1, 2]
    assert all(len(e["clients"]) == 2 for e in history if e["round"] > 0)
    report = (run_dir / "report.md").read_text()
    assert "## Audit" in report
    settings = [*COMPARED.values(), "client-1 alone (DP)", "client-2 alone (DP)"]
    assert [name for name in settings if f"\n| {name} | " not in report] == [], report
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


def test_a_node_that_cannot_see_the_data_is_refused_before_round_one(cluster: Cluster, data_file, tmp_path):
    if not can_hide_folders():
        pytest.skip("no mount namespaces here to hide a folder from one node")
    joined = f"simulation.ray_address={cluster.address}"
    cfg = load_config(overrides=[*SETS, f"data.path={data_file}", joined])
    with pytest.raises(ConfigError) as refused:
        sim_run.simulate(cfg, tmp_path / "run")
    said = str(refused.value)
    assert "\n" not in said and said.startswith("data.path: node "), said
    assert f"cannot see {data_file};" in said, said
    assert not (tmp_path / "run" / "history.json").exists() and not (tmp_path / "run" / "ledgers").exists()
