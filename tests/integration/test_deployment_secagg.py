"""Round 0 under secure aggregation over a real deployment on 127.0.0.1: a TLS SuperLink with node
authentication, and three institutions as they run (fedlora-client start: SuperNode, SuperExec, the
kept-loaded worker; the round's keys travel in the node's context between the five messages), each with
its identity key and the federation's roster (made by fedlora-client keys; the coordinator holds the
roster too), so the round is the signed one. One
institution is killed (SIGKILL of its daemon, SuperNode, SuperExec and worker) mid-round: after its
masked input, the survivors' shares unmask the sum with its input in it; before it, with no dropout
tolerated, the round is discarded and nothing is unmasked. Either way the federation goes on.

Each test takes 2 to 3 minutes on a shared 2-core machine: three institutions start (torch imported
by every worker), and the SuperLink reports a SIGKILLed node unavailable only after its heartbeats
lapse (about 50 s), which the stage waits for."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from fedlora.client import cli as client_cli
from fedlora.client.ledger import STATISTICS_ROUND, PrivacyLedger
from fedlora.common import protocol as P
from fedlora.common.secure_aggregation.identity import load_signing_key, public_bytes, write_roster
from fedlora.server import deploy
from helpers.deploy import Federation, Processes, free_port, make_federation, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.integration]

INSTITUTIONS = ("a", "b", "c")
SENT = "Sent successfully"  # Flower's line for every reply a SuperNode sent


def secure_federation(root: Path, **federation: object) -> Federation:
    fed = make_federation(
        root,
        {
            "rounds": 1,
            "round_timeout": 120,
            "node_wait_timeout": 180,
            "secure_aggregation": True,
            "secagg_threshold": 2,
            **federation,
        },
        institutions=INSTITUTIONS,
        admitted=INSTITUTIONS,
    )
    roster = root / "roster.yaml"
    identities = {}
    for name in INSTITUTIONS:
        config = yaml.safe_load(fed.institutions[name].read_text())
        config["privacy"].update({"epsilon": 30, "audit_log": "audit.jsonl"})
        config["security"].update({"identity_key": "identity.key", "identity_roster": str(roster)})
        fed.institutions[name].write_text(yaml.safe_dump(config))
        assert client_cli.main(["keys", str(fed.institutions[name])]) == 0  # the identity: node key exists
        identities[config["name"]] = public_bytes(load_signing_key(root / name / "identity.key"))
    write_roster(roster, identities)
    coordinator = yaml.safe_load(fed.server_yaml.read_text())
    coordinator["security"]["identity_roster"] = str(roster)
    fed.server_yaml.write_text(yaml.safe_dump(coordinator))
    return fed


def start(fed: Federation, processes: Processes) -> None:
    processes.start("server", fed.server_cmd())
    processes.wait_log("server", "submitted", 120)
    for name in INSTITUTIONS:
        processes.start(name, fed.client_cmd(name, "--runtime-port", str(free_port())))


def sent(processes: Processes, name: str) -> int:
    return processes.log(name).count(SENT)


def audited(fed: Federation, name: str) -> list[dict]:
    """This institution's round-0 audit lines: one per message that left."""
    path = fed.root / name / "audit.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [line for line in lines if line["round"] == 0]


def stages(fed: Federation, name: str) -> list[str]:
    """The secure-aggregation stages this institution answered."""
    return [line["configs"][P.CONFIG].get(P.SECAGG_STAGE) for line in audited(fed, name)]


def released_rows(fed: Federation, name: str) -> float:
    """The rows this institution's audit log says its masked input released."""
    lines = audited(fed, name)
    (masked,) = [a for a in lines if a["configs"][P.CONFIG].get(P.SECAGG_STAGE) == P.MASKED_INPUT]
    return masked["metrics"]["metrics"][P.NUM_EXAMPLES]


def node_ids(processes: Processes) -> dict[str, int]:
    """Each institution's node id, from the coordinator's 'admitted .../<name>/node.key.pub as node N'."""
    said = [line for line in processes.log("server").splitlines() if " as node " in line]
    return {n: int(next(s for s in said if f"/{n}/node.key.pub" in s).split()[-1]) for n in INSTITUTIONS}


def rounds(fed: Federation) -> list[dict]:
    return json.loads((fed.run_dir / "history.json").read_text())


def test_an_institution_killed_before_unmasking_is_in_the_sum_from_the_survivors_shares(
    tmp_path, processes
) -> None:
    fed = secure_federation(tmp_path, min_clients=3, secagg_dropouts=1)
    start(fed, processes)
    # c dies once its masked input has left, before the unmask message reaches it.
    wait_for(lambda: sent(processes, "c") >= 3, 240, "c sending its masked input", processes.tails)
    processes.kill("c")
    assert processes.wait("server", 300) == 0, processes.tails()

    assert stages(fed, "c") == [P.ADVERTISE_KEYS, P.SHARE_KEYS, P.MASKED_INPUT]
    for name in ("a", "b"):
        assert stages(fed, name) == list(P.SECAGG_STAGES)
    nodes = node_ids(processes)
    round0, round1 = rounds(fed)
    assert round0["aggregation"]["secagg_survivors"] == 3 and len(round0["clients"]) == 3
    # The SuperLink reported c unavailable at the unmask (as node 1): dropped under c's own id.
    assert [(d["node"], d["reason"].split(" (")[0]) for d in round0["dropped"]] == [
        (nodes["c"], "node unavailable")
    ]
    # The unmasked sum holds the rows the three audit logs say were released, c's among them (its 40
    # rows are more than twice the bound), within the sum's noise (2 classes of 3 noise shares).
    rows = {name: released_rows(fed, name) for name in INSTITUTIONS}
    share = max(c[P.NOISE_STD] for c in round0["clients"])
    bound = 6 * share * math.sqrt(3 * 2) + round0["aggregation"]["secagg_quantisation_error"]
    assert bound < rows["c"] / 2
    assert abs(round0["aggregation"]["secagg_rows"] - sum(rows.values())) < bound
    # The federation went on: round 1 trained on the two left.
    assert {c["node"] for c in round1["clients"]} == {nodes["a"], nodes["b"]}
    for name in INSTITUTIONS:
        entry = PrivacyLedger(fed.ledger(name), 30.0, 1e-5, "prv").entries[0]
        assert entry.round == STATISTICS_ROUND
        assert entry.share_noise_multiplier is not None and entry.epsilon_alone > entry.epsilon
    for name in ("a", "b"):
        assert processes.terminate(name, 60) == 0


def test_more_lost_than_tolerated_discards_round_0_unmasking_nothing_and_the_federation_goes_on(
    tmp_path, processes
) -> None:
    # No dropout tolerated: round 0 starts once two institutions are connected (or all three).
    fed = secure_federation(tmp_path, min_clients=2, secagg_dropouts=0)
    start(fed, processes)
    # The first institution to send its shares dies before its masked input leaves.
    wait_for(
        lambda: any(sent(processes, n) >= 2 for n in INSTITUTIONS), 240, "shares sent", processes.tails
    )
    victim = next(n for n in INSTITUTIONS if sent(processes, n) >= 2)
    processes.kill(victim)
    assert processes.wait("server", 300) == 0, processes.tails()

    assert stages(fed, victim) == [P.ADVERTISE_KEYS, P.SHARE_KEYS]
    assert all(P.UNMASK not in stages(fed, n) for n in INSTITUTIONS)  # nothing was unmasked
    nodes = node_ids(processes)
    round0, round1 = rounds(fed)
    assert round0["clients"] == [] and "secagg_rows" not in round0.get("aggregation", {})
    assert nodes[victim] in {d["node"] for d in round0["dropped"]}
    serverapp = deploy.RunFolder(fed.run_dir).serverapp_log.read_text()
    assert "the run goes on without the statistics head" in serverapp
    # Round 1 trained on the two institutions left (the survivor, and the third if it joined late).
    assert {c["node"] for c in round1["clients"]} == {nodes[n] for n in INSTITUTIONS if n != victim}
    for name in INSTITUTIONS:
        if name != victim:
            assert processes.terminate(name, 60) == 0
