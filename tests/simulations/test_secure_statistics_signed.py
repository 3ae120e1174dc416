"""Round 0 under secure aggregation against a malicious coordinator, through the real server body
(server.secure_statistics) and the real ClientApps of three virtual institutions (helpers.secagg, each
with its identity from simulations.identities): a coordinator that substitutes an institution's keys in
the roster, or tells survivors different survivor lists, gets neither a share it can read nor an answer
to the unmask."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

from fedlora.common import protocol as P
from fedlora.common.adapter import adapter_state
from fedlora.common.config import FedloraConfig, load_config
from fedlora.common.secure_aggregation import keys
from fedlora.common.secure_aggregation.server import ServerRound
from fedlora.server import secure_statistics as secure
from fedlora.server.app import as_record, server_workbench
from fedlora.server.strategy import build_strategy
from helpers.secagg import NODES, SecAggGrid, inside_a_serverapp

CONFIG = [
    "model.source=tiny-bert",
    "data.max_length=32",
    "privacy.enabled=false",
    "federation.min_clients=3",
    "federation.central_eval=false",
    "simulation.num_clients=3",
    "simulation.partition=iid",
    "federation.secure_aggregation=true",
    "federation.secagg_threshold=2",
    "federation.secagg_dropouts=1",
]
VICTIM = NODES[-1]


@pytest.fixture(autouse=True)
def _inside_a_serverapp(monkeypatch) -> None:
    inside_a_serverapp(monkeypatch)


def round_0(grid: SecAggGrid, cfg: FedloraConfig) -> ArrayRecord | None:
    bench, _ = server_workbench(cfg)
    strategy = build_strategy(cfg, bench.built.fingerprint, len(NODES))
    return secure.secure_statistics(grid, strategy, as_record(adapter_state(bench.built.model)), cfg)


def answered(grid: SecAggGrid, stage: str) -> list[Message]:
    """The replies of ``stage`` the coordinator received that are not errors."""
    return [
        reply
        for reply in grid.received
        if not reply.has_error() and reply.content[P.CONFIG].get(P.SECAGG_STAGE) == stage
    ]


class Substituting(SecAggGrid):
    """A coordinator in the middle: the roster it relays to the others carries its own cipher key for
    the victim, so that it could open the shares they seal to the victim."""

    attacker = keys.X25519PrivateKey.generate()

    def send_and_receive(self, messages, timeout=None):
        for msg in messages:
            stage = msg.content[P.CONFIG].get(P.SECAGG_STAGE)
            if stage == P.SHARE_KEYS and msg.metadata.dst_node_id != VICTIM:
                roster = dict(msg.content[P.SECAGG_ROSTER].items())
                own = np.frombuffer(keys.public_bytes(self.attacker), dtype=np.uint8).copy()
                roster[f"{VICTIM}/{P.CIPHER_KEY}"] = Array(own)
                msg.content[P.SECAGG_ROSTER] = ArrayRecord(roster)
        return super().send_and_receive(messages, timeout)


def test_a_coordinator_substituting_keys_in_the_roster_gets_no_share_sealed_to_them(tmp_path):
    cfg = load_config(overrides=CONFIG)
    grid = Substituting(cfg, tmp_path)
    assert round_0(grid, cfg) is None  # discarded: no head, nothing unmasked
    shares = answered(grid, P.SHARE_KEYS)
    assert {reply.metadata.src_node_id for reply in shares} == set(NODES)
    for reply in shares:
        if reply.metadata.src_node_id != VICTIM:
            assert str(VICTIM) not in reply.content[P.ARRAYS]  # nothing sealed to the substituted key
    assert P.UNMASK not in grid.stages


class Equivocating(ServerRound):
    """A coordinator that skips its own check of the survivors' signatures and relays them all."""

    def collect_signatures(self, signatures):
        self._advance("consistency")
        return dict(signatures)


class TwoLists(SecAggGrid):
    """Tells node 101 that everyone survived and node 102 that the victim dropped (the victim itself is
    not asked), hoping for the victim's seed share from one and its key share from the other."""

    def send_and_receive(self, messages, timeout=None):
        told = []
        for msg in messages:
            config = msg.content[P.CONFIG]
            if P.SECAGG_SURVIVORS in config:
                if msg.metadata.dst_node_id == VICTIM:
                    continue
                if msg.metadata.dst_node_id == NODES[1]:
                    config[P.SECAGG_SURVIVORS] = [str(n) for n in NODES if n != VICTIM]
            told.append(msg)
        return super().send_and_receive(told, timeout)


def test_survivors_told_different_survivor_lists_give_no_unmask_answer(tmp_path, monkeypatch):
    monkeypatch.setattr(secure, "ServerRound", Equivocating)
    cfg = load_config(overrides=CONFIG)
    grid = TwoLists(cfg, tmp_path)
    assert round_0(grid, cfg) is None
    assert P.UNMASK in grid.stages  # the coordinator asked, with every signature relayed
    leaked = [set(reply.content[P.ARRAYS]) for reply in answered(grid, P.UNMASK)]
    assert leaked == []  # neither answered: no seed and key of the victim both left


def test_an_institution_without_identities_refuses_in_one_line_and_the_others_go_on(tmp_path):
    cfg = load_config(overrides=CONFIG)
    grid = SecAggGrid(cfg, tmp_path)
    setup = grid.setups[VICTIM]
    unsigned = replace(setup.cfg.security, identity_key=None, identity_roster=None)
    grid.setups[VICTIM] = replace(setup, cfg=replace(setup.cfg, security=unsigned))
    assert round_0(grid, cfg) is not None  # 101 and 102: the threshold, one tolerated dropout
    assert {reply.metadata.src_node_id for reply in answered(grid, P.UNMASK)} == {NODES[0], NODES[1]}
    (log,) = tmp_path.glob(f"**/client-{NODES.index(VICTIM)}-errors.log")
    assert "security.identity_key is not set; without identities a coordinator could" in log.read_text()
