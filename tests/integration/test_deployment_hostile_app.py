"""A hostile Flower app against a real TLS deployment: an institution holding only the address and
ca.crt tries `flwr run` of its own app; the coordinator's port refuses it. The same app submitted on
the coordinator's own machine (a compromised coordinator) reaches the SuperNode, which refuses to run
it. Nothing of the institution's files is read, and fedlora's own run still completes.

Also the pieces alone: the Fleet gate's routing and the institution's check of a run's app bundle."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml
from flwr.supercore.retry.http_retry import make_simple_http_retry_invoker
from starlette.testclient import TestClient

from fedlora.client import own_app
from fedlora.client.daemon import SuperNodeOptions, supernode_command
from fedlora.common import protocol as P
from fedlora.common.config import load_config
from fedlora.common.launch import flower_program
from fedlora.server import deploy
from fedlora.server.fleet_gate import gate_app
from helpers.deploy import free_port, make_federation, wait_for

ROOT = Path(__file__).resolve().parents[2]

HOSTILE_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "hostile"
version = "1.0.0"
dependencies = ["flwr"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "hostile_app:server"
clientapp = "hostile_app:client"

[tool.flwr.app.config]
"""

HOSTILE_APP = """
from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

MARKS = Path({marks!r})
client = ClientApp()
server = ServerApp()


@client.query()
def steal(msg, context):
    (MARKS / "client-ran").write_text("yes")
    yaml_text = Path(str(context.node_config["config"])).read_text()
    return Message(RecordDict({{"loot": ConfigRecord({{"yaml": yaml_text}})}}), reply_to=msg)


@server.main()
def main(grid, context):
    (MARKS / "server-ran").write_text("yes")
    nodes = []
    for _ in range(60):
        nodes = list(grid.get_node_ids())
        if nodes:
            break
        import time
        time.sleep(1)
    out = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]
    got = []
    for reply in grid.send_and_receive(out, timeout=60):
        got.append(reply.content["loot"]["yaml"] if reply.has_content() else "error")
        print("LOOT", got[-1])
    (MARKS / "server-got").write_text(repr(got))
"""


def write_hostile_app(folder: Path, marks: Path) -> Path:
    folder.mkdir()
    (folder / "pyproject.toml").write_text(HOSTILE_PYPROJECT)
    (folder / "hostile_app.py").write_text(HOSTILE_APP.format(marks=str(marks)))
    return folder


def fab(pyproject: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("pyproject.toml", pyproject)
    return buffer.getvalue()


def test_only_a_bundle_naming_fedloras_app_is_taken_part_in() -> None:
    ours = (ROOT / "pyproject.toml").read_text()
    app = tomllib.loads(ours)["tool"]["flwr"]["app"]
    assert app["publisher"] == P.APP_PUBLISHER and app["components"] == P.APP_COMPONENTS
    own_app.check_app(fab(ours))
    with pytest.raises(own_app.ForeignApp, match="publisher 'mallory'"):
        own_app.check_app(fab(HOSTILE_PYPROJECT))
    with pytest.raises(own_app.ForeignApp, match="components"):
        own_app.check_app(fab(ours.replace('clientapp = "fedlora.client.relay:app"', 'clientapp = "x:app"')))
    with pytest.raises(own_app.ForeignApp, match="not a valid Flower App"):
        own_app.check_app(b"not a zip")
    try:
        own_app.check_app(fab(HOSTILE_PYPROJECT))
    except own_app.ForeignApp:
        record = logging.LogRecord("flwr", logging.ERROR, "", 0, "%s raised", ("ClientApp",), sys.exc_info())
    assert own_app.OneLineRefusal().filter(record) and record.exc_info is None
    assert record.getMessage().startswith("refused: the run's app is not fedlora's (publisher 'mallory'")
    loaded = own_app.load_own_app(default_app_ref="", app_path=None, multi_app=True)("@m/h", "1", "ff")
    from fedlora.client.relay import app as relay_app

    assert loaded is relay_app


def test_the_supernode_launches_nothing_and_its_superexec_only_fedloras_runner(tmp_path) -> None:
    cmd = own_app.superexec_command(tmp_path, 9111)
    program = tmp_path / "bin" / "flwr-clientapp"
    assert cmd[1:6] == ["-P", "-m", "fedlora.client.own_app", "superexec", str(program)]
    assert cmd[cmd.index("--runtime-api-address") + 1] == "127.0.0.1:9111"
    assert (tmp_path / "bin").stat().st_mode & 0o077 == 0
    assert program.read_text().endswith(f"{sys.executable} -P -m fedlora.client.own_app \"$@\"\n")
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "node.key").write_text("x")
    config = tmp_path / "inst.yaml"
    config.write_text(yaml.safe_dump({"security": {"ca_cert": "ca.crt", "node_private_key": "node.key"}}))
    supernode = supernode_command(load_config(config), config, SuperNodeOptions(), tmp_path)
    assert supernode[supernode.index("--isolation") + 1] == "process"


def test_the_gate_passes_fleet_calls_and_nothing_else() -> None:
    seen: list[tuple[str, bytes, str | None]] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.content, request.headers.get("x-sig")))
        return httpx.Response(200, content=b"answer", headers={"content-type": "application/protobuf"})

    real_client = httpx.AsyncClient

    def mocked(**kwargs) -> httpx.AsyncClient:
        return real_client(**kwargs, transport=httpx.MockTransport(upstream))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(httpx, "AsyncClient", mocked)
        app = gate_app("http://superlink", False)
        with TestClient(app) as client:
            ok = client.post("/v1/fleet/pull-messages", content=b"\x01\x02", headers={"x-sig": "s"})
            assert ok.status_code == 200 and ok.content == b"answer"
            for path in (
                "/v1/control/start-run",
                "/v1/control/stream-logs",
                "/v1/fleet/../control/start-run",
                "/v1/fleet/%2e%2e/control/start-run",
                "/v1/fleet/a/b",
                "/docs",
            ):
                assert client.post(path, content=b"x").status_code == 404, path
            assert client.get("/v1/fleet/pull-messages").status_code in (404, 405)
    assert seen == [("/v1/fleet/pull-messages", b"\x01\x02", "s")]


def test_the_gate_answers_a_retryable_code_while_the_superlink_is_not_up() -> None:
    """A restarted coordinator's gate listens before its SuperLink does: a SuperNode's heartbeat in
    that window once got 500, which ends Flower's heartbeat thread for good, and the node, still
    pulling and answering, was declared unavailable mid-round (test_deployment's killed-server run)."""
    retry = make_simple_http_retry_invoker()
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with TestClient(gate_app(closed, False), raise_server_exceptions=False) as client:
        answer = client.post("/v1/fleet/send-node-heartbeat", content=b"\x01")
    assert answer.status_code == 502
    request = httpx.Request("POST", closed)
    refused = httpx.HTTPStatusError("", request=request, response=httpx.Response(502, request=request))
    assert retry.should_giveup is not None and not retry.should_giveup(refused)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    real_client = httpx.AsyncClient
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(httpx, "AsyncClient", lambda **kw: real_client(**kw, transport=httpx.MockTransport(slow)))
        with TestClient(gate_app("http://superlink", False), raise_server_exceptions=False) as client:
            assert client.post("/v1/fleet/pull-messages", content=b"\x01").status_code == 504


def flwr_json(args: list[str], home: Path, env: dict[str, str]) -> dict:
    done = subprocess.run(
        [flower_program("flwr"), *args, "--format", "json"],
        env={**env, "FLWR_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"success": False, "error-message": done.stdout + done.stderr}


@pytest.mark.integration
def test_a_hostile_app_runs_nowhere_and_reads_nothing(tmp_path, processes) -> None:
    fed = make_federation(
        tmp_path,
        {"rounds": 2, "min_clients": 1, "round_timeout": 120, "node_wait_timeout": 180},
        institutions=("a",),
        admitted=("a",),
    )
    marks = tmp_path / "marks"
    marks.mkdir()
    hostile = write_hostile_app(tmp_path / "hostile", marks)
    processes.start("server", fed.server_cmd())
    processes.wait_log("server", "submitted", 120)

    # The institution's attacker: a Flower home with the federation's address and ca.crt only.
    mallory = tmp_path / "mallory-home"
    mallory.mkdir()
    ca = yaml_ca(fed.institutions["a"])
    address = fed_address(fed.server_yaml)
    (mallory / "config.toml").write_text(
        f'[superlink]\ndefault = "coord"\n\n[superlink.coord]\naddress = "{address}"\n'
        f'root-certificates = "{ca}"\n'
    )
    attempt = flwr_json(["run", str(hostile), "coord"], mallory, processes.env)
    assert not attempt.get("success"), attempt
    logs = flwr_json(["ls", "coord"], mallory, processes.env)
    assert not logs.get("success"), logs

    # A compromised coordinator submits it on its own machine: the SuperNode refuses the bundle.
    coordinator_home = fed.run_dir / "superlink" / "flwr-home"
    inside = flwr_json(["run", str(hostile), deploy.CONNECTION], coordinator_home, processes.env)
    assert inside.get("success"), inside
    processes.start("a", fed.client_cmd("a", "--runtime-port", str(free_port())))
    wait_for(lambda: (marks / "server-got").exists(), 240, "the hostile ServerApp's replies", processes.tails)

    assert processes.wait("server", 360) == 0, processes.tails()
    assert not (marks / "client-ran").exists()
    got = (marks / "server-got").read_text()
    assert got == "['error']", got
    assert "refused: the run's app is not fedlora's" in processes.log("a"), processes.tails(60)
    assert "Traceback" not in processes.log("a"), processes.tails(60)
    installed = tmp_path / "flwr-home" / "apps"
    assert not installed.exists() or not any("mallory" in p.name for p in installed.iterdir())
    history = [e for e in json.loads((fed.run_dir / "history.json").read_text()) if e["round"]]
    assert [e["round"] for e in history] == [1, 2] and all(len(e["clients"]) == 1 for e in history)
    assert processes.terminate("a", 60) == 0


def yaml_ca(config: Path) -> str:
    return str(yaml.safe_load(config.read_text())["security"]["ca_cert"])


def fed_address(server_yaml: Path) -> str:
    return str(yaml.safe_load(server_yaml.read_text())["federation"]["superlink_address"])
