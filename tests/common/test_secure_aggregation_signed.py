"""Secure aggregation against a malicious coordinator (common/secure_aggregation, Bell et al. 2020): the
state machines driven by a coordinator that substitutes keys in the roster it relays, or tells survivors
different survivor lists; institutions refuse both, and a correct signed round still sums exactly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedlora.common.errors import ConfigError, RoundDiscarded, SecureAggregationError
from fedlora.common.secure_aggregation.client import ClientRound
from fedlora.common.secure_aggregation.identity import Identity, Roster, public_bytes, survivors_message
from fedlora.common.secure_aggregation.quantise import Quantiser
from fedlora.common.secure_aggregation.server import ServerRound
from fedlora.common.secure_aggregation.settings import SecAggConfig
from helpers.identities import identities

CONTEXT = b"signed-run/round-0"
LENGTH = 300
NODES = [11, 22, 33, 44, 55]
CONFIG = SecAggConfig(threshold=3, tolerated_dropouts=2)


class Round:
    """Five institutions with their identities, a server holding no roster (as a coordinator may)."""

    def __init__(self, config: SecAggConfig = CONFIG) -> None:
        self.ids = identities(NODES)
        self.server = ServerRound(config, CONTEXT, LENGTH, sampled=len(NODES))
        self.clients = {n: ClientRound(n, config, CONTEXT, self.ids[n]) for n in NODES}
        rng = np.random.default_rng(1)
        self.inputs = {n: rng.normal(size=LENGTH) for n in NODES}
        self.roster = self.server.collect_keys({n: c.advertise_keys(1.0) for n, c in self.clients.items()})

    def masked(self) -> list[int]:
        inbox = self.server.route_shares(
            {n: c.share_keys(self.roster, self.server.threshold) for n, c in self.clients.items()}
        )
        return self.server.collect_masked(
            {n: self.clients[n].masked_input(inbox[n], self.inputs[n]) for n in NODES}
        )


def test_a_correct_signed_round_sums_exactly():
    run = Round()
    survivors = run.masked()
    signed = run.server.collect_signatures({n: run.clients[n].sign_survivors(survivors) for n in survivors})
    total = run.server.unmask({n: run.clients[n].unmask(signed) for n in survivors})
    quantiser = Quantiser.of(CONFIG)
    expected = sum((quantiser.quantise(v) for v in run.inputs.values()), start=np.zeros(LENGTH, "u4"))
    assert np.array_equal(total, expected)


def own_identity() -> Identity:
    """An identity of the coordinator's (or a stranger's): in its own roster, in no institution's."""
    key = Ed25519PrivateKey.generate()
    return Identity(key, Roster.of({"stranger": public_bytes(key)}))


@pytest.mark.parametrize("signer", ["victim", "coordinator"])
def test_a_coordinator_substituting_an_institutions_keys_gets_no_share_sealed_to_them(signer):
    """The coordinator relays round keys of its own for node 55 (a man in the middle): left under 55's
    identity and signature the signature fails; signed by its own identity, the identity is unknown. No
    institution seals a share to the substituted key; each shares only with the four verified peers, so
    the round the coordinator routes is discarded and nothing is unmasked."""
    run = Round()
    victim = NODES[-1]
    forged = ClientRound(victim, CONFIG, CONTEXT, own_identity()).advertise_keys(1.0)
    if signer == "victim":
        forged = replace(run.roster[victim], keys=forged.keys)
    roster = {**run.roster, victim: forged}
    sent = {n: run.clients[n].share_keys(roster, run.server.threshold) for n in NODES[:-1]}
    for sender, sealed in sent.items():
        assert set(sealed) == set(NODES[:-1]) - {sender}  # nothing sealed to the substituted keys
    with pytest.raises(RoundDiscarded, match="shared keys, fewer than the threshold"):
        run.server.route_shares(sent)
    assert run.server.discarded


def test_an_unknown_or_reused_identity_is_refused_and_too_few_left_refuse_the_round():
    majority = SecAggConfig(tolerated_dropouts=2)  # the threshold: a strict majority of the roster relayed
    run = Round(majority)
    outsider = ClientRound(66, CONFIG, CONTEXT, own_identity()).advertise_keys(1.0)  # validly signed
    reused = ClientRound(77, majority, CONTEXT, run.ids[11]).advertise_keys(1.0)  # 11's identity twice
    roster = {**run.roster, 66: outsider, 77: reused}
    sealed = run.clients[22].share_keys(roster, 4)  # 4 of 7: a strict majority of the relayed roster
    assert set(sealed) == {33, 44, 55}  # neither 11 nor 77 (one identity, two nodes), nor 66
    run = Round(majority)
    reused = ClientRound(77, majority, CONTEXT, run.ids[11]).advertise_keys(1.0)
    roster = {**run.roster, 66: outsider, 77: reused}
    for node in (33, 44):
        roster[node] = replace(roster[node], signature=bytes(64))
    with pytest.raises(RoundDiscarded, match=r"2 of the roster's 7 institutions carry a valid signature"):
        run.clients[22].share_keys(roster, 4)  # 22 and 55 left: below the threshold, nothing shared


def test_survivors_told_different_survivor_lists_answer_neither():
    """The coordinator tells 11 and 22 that everyone survived and 33 and 44 that 55 dropped, hoping for
    55's seed shares from the first and its key shares from the second. Each signs the list it was
    sent; relayed every signature, none finds threshold (3) signatures over its own list: no answer."""
    run = Round()
    everyone = run.masked()
    without = [n for n in everyone if n != NODES[-1]]
    told = {11: everyone, 22: everyone, 33: without, 44: without}
    signatures = {n: run.clients[n].sign_survivors(lst) for n, lst in told.items()}
    for node in told:
        with pytest.raises(RoundDiscarded, match="2 survivors signed the survivor list"):
            run.clients[node].unmask(signatures)
        with pytest.raises(SecureAggregationError, match="asked to unmask at stage done"):
            run.clients[node].unmask(signatures)  # and never again, with other signatures


def test_a_colluder_signing_both_lists_still_gets_no_answer():
    """With a colluding institution (44) that signs both lists, the threshold rises above (5 + 1) / 2
    (a strict majority, 3, is refused: two lists could then each gather 3 signatures)."""
    with pytest.raises(ConfigError, match="not above"):
        Round(SecAggConfig(threshold=3, tolerated_colluders=1))
    run = Round(SecAggConfig(tolerated_dropouts=1, tolerated_colluders=1))
    assert run.server.threshold == 4
    everyone = run.masked()
    without = [n for n in everyone if n != 55]
    told = {55: everyone, 11: everyone, 22: without, 33: without}
    signatures = {n: run.clients[n].sign_survivors(lst) for n, lst in told.items()}
    context = run.clients[11].context
    for node, lst in told.items():
        colluder = run.ids[44].sign(survivors_message(context, lst))
        with pytest.raises(RoundDiscarded, match="3 survivors signed the survivor list"):
            run.clients[node].unmask({**signatures, 44: colluder})


def test_signatures_from_outside_the_list_or_forged_do_not_count():
    run = Round()
    survivors = run.masked()[:3]  # 44 and 55 "dropped"
    signatures = {n: run.clients[n].sign_survivors(survivors) for n in survivors[:2]}
    signatures[44] = run.ids[44].sign(b"anything")  # not a survivor of the list
    signatures[33] = bytes(64)  # a forged signature of a survivor
    with pytest.raises(RoundDiscarded, match="2 survivors signed"):
        run.clients[11].unmask(signatures)
