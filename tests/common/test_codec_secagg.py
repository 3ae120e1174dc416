"""The secure aggregation replies of round 0 (common.codec): every stage built, checked as the audit mod
checks what leaves, parsed by the server, with each institution's round kept as bytes between the
steps (as the ClientApp keeps it in its context state); and what the codec refuses."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedlora.common import protocol as P
from fedlora.common.codec import (
    HeadMetrics,
    TrainMetrics,
    advert_reply,
    check_outgoing,
    consistency_reply,
    is_join,
    join_reply,
    masked_reply,
    parse_advert,
    parse_consistency,
    parse_join,
    parse_masked,
    parse_shares,
    parse_unmask,
    shares_reply,
    unmask_reply,
)
from fedlora.common.errors import AdapterError
from fedlora.common.secure_aggregation.client import ClientRound
from fedlora.common.secure_aggregation.quantise import Quantiser, ring_dtype
from fedlora.common.secure_aggregation.server import ServerRound
from fedlora.common.secure_aggregation.settings import for_statistics
from helpers.identities import identities

FP = "fp-1"
NODES = (11, 22, 33)
ID = identities([11])[11]
METRICS = TrainMetrics(
    num_examples=5, epsilon=1.0, lora_r=4, lora_scale=2.0, steps=0, train_seconds=0.1, noise_std=0.5
)


def run_round(vectors: dict[int, np.ndarray], lost_at_mask: tuple[int, ...] = ()) -> np.ndarray:
    settings = for_statistics(2, 1, 0)
    length = next(iter(vectors.values())).size
    ids = identities(NODES)
    server = ServerRound(settings, b"ctx", length, len(NODES), ids[NODES[0]].roster)
    kept: dict[int, bytes] = {}
    adverts = {}
    for node in NODES:
        round_ = ClientRound(node, settings, b"ctx", ids[node])
        reply = advert_reply(round_.advertise_keys(1.5), FP)
        check_outgoing(reply, "train")
        adverts[node] = parse_advert(reply, FP)
        assert adverts[node].noise == 1.5
        kept[node] = round_.to_bytes()
    roster = server.collect_keys(adverts)
    sent = {}
    for node in roster:
        round_ = ClientRound.from_bytes(kept[node], settings, ids[node])
        reply = shares_reply(round_.share_keys(roster, server.threshold), FP)
        check_outgoing(reply, "train")
        sent[node] = parse_shares(reply, FP, 200)
        kept[node] = round_.to_bytes()
    inboxes = server.route_shares(sent)
    masked = {}
    for node in inboxes:
        round_ = ClientRound.from_bytes(kept[node], settings, ids[node])
        reply = masked_reply(round_.masked_input(inboxes[node], vectors[node]), METRICS, FP)
        check_outgoing(reply, "train")
        kept[node] = round_.to_bytes()
        if node not in lost_at_mask:
            masked[node] = parse_masked(reply, FP, length, ring_dtype(settings.ring_bits))[0]
    survivors = server.collect_masked(masked)
    signatures = {}
    for node in survivors:
        round_ = ClientRound.from_bytes(kept[node], settings, ids[node])
        reply = consistency_reply(round_.sign_survivors(survivors), FP)
        check_outgoing(reply, "train")
        signatures[node] = parse_consistency(reply, FP)
        kept[node] = round_.to_bytes()
    relayed = server.collect_signatures(signatures)
    answers = {}
    for node in survivors:
        reply = unmask_reply(ClientRound.from_bytes(kept[node], settings, ids[node]).unmask(relayed), FP)
        check_outgoing(reply, "train")
        answers[node] = parse_unmask(reply, FP, 66)
    return server.aggregate(answers)


def test_a_round_through_the_codec_and_the_saved_state_sums_the_survivors_exactly():
    rng = np.random.default_rng(0)
    vectors = {node: rng.normal(0, 50, 40) for node in NODES}
    step_bound = Quantiser.of(for_statistics(2, 1, 0)).sum_error(3)
    assert np.abs(run_round(vectors) - sum(vectors.values())).max() <= step_bound
    two = run_round(vectors, lost_at_mask=(33,))
    assert np.abs(two - vectors[11] - vectors[22]).max() <= step_bound


def test_the_codec_refuses_a_plain_vector_an_unknown_stage_or_an_extra_config_key():
    plain = masked_reply(np.zeros(4, dtype=np.uint64), METRICS, FP)
    plain[P.ARRAYS] = ArrayRecord({P.MASKED: Array(np.zeros(4, dtype=np.float32))})
    with pytest.raises(AdapterError, match="uint32, uint64"):
        check_outgoing(plain, "train")
    for change in ({P.SECAGG_STAGE: "reveal"}, {"extra": 1}):
        reply = advert_reply(ClientRound(11, for_statistics(2, 1, 0), b"c", ID).advertise_keys(1.0), FP)
        reply[P.CONFIG] = ConfigRecord({**dict(reply[P.CONFIG]), **change})
        with pytest.raises(AdapterError):
            check_outgoing(reply, "train")
    with pytest.raises(AdapterError, match="fingerprint"):
        advert = ClientRound(11, for_statistics(2, 1, 0), b"c", ID).advertise_keys(1.0)
        parse_advert(advert_reply(advert, "other"), FP)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5, "1.0", True, None])
def test_an_advert_with_a_malformed_or_missing_noise_multiplier_is_refused_in_one_line(bad):
    advert = ClientRound(11, for_statistics(2, 1, 0), b"c", ID).advertise_keys(2.0)
    with pytest.raises(AdapterError) as built:
        advert_reply(replace(advert, noise=bad), FP)  # None: no multiplier at all
    reply = advert_reply(advert, FP)
    config = {k: v for k, v in dict(reply[P.CONFIG]).items() if k != P.SECAGG_NOISE}
    reply[P.CONFIG] = ConfigRecord(config if bad is None else {**config, P.SECAGG_NOISE: bad})
    with pytest.raises(AdapterError) as parsed:
        parse_advert(reply, FP)
    for err in (built, parsed):
        assert P.SECAGG_NOISE in str(err.value) and "\n" not in str(err.value)
    assert parse_advert(advert_reply(replace(advert, noise=0.0), FP), FP).noise == 0.0  # no DP: allowed


def test_a_signed_advert_and_a_consistency_signature_are_checked_for_their_parts_and_sizes():
    advert = ClientRound(11, for_statistics(2, 1, 0), b"c", ID).advertise_keys(1.0)
    assert parse_advert(advert_reply(advert, FP), FP) == advert
    reply = advert_reply(replace(advert, signature=advert.signature[:63]), FP)
    with pytest.raises(AdapterError, match="signature"):
        parse_advert(reply, FP)
    unsigned = advert_reply(advert, FP)
    unsigned[P.ARRAYS] = ArrayRecord({k: v for k, v in unsigned[P.ARRAYS].items() if k != P.SIGNATURE})
    with pytest.raises(AdapterError, match="expected exactly"):
        parse_advert(unsigned, FP)
    with pytest.raises(AdapterError, match="signature"):
        parse_consistency(consistency_reply(b"\x01" * 65, FP), FP)


def test_a_head_rounds_join_and_masked_replies_leave_without_a_row_count_and_are_told_apart():
    """Under secure aggregation a head round is joined by a reply that carries nothing, and its masked
    input carries the head's metrics (no row count): the server parses it only as a head round's, and a
    statistics masked reply only as round 0's."""
    join = join_reply(FP)
    check_outgoing(join, "train")
    assert is_join(join) and parse_join(join, FP) is None and len(join[P.ARRAYS]) == 0
    with pytest.raises(AdapterError, match="fingerprint"):
        parse_join(join, "other")
    head = HeadMetrics(epsilon=1.0, steps=1, train_seconds=0.1, noise_std=0.3)
    vector = np.arange(6, dtype=np.uint64)
    masked = masked_reply(vector, head, FP)
    check_outgoing(masked, "train")
    assert P.NUM_EXAMPLES not in masked[P.METRICS]
    got, metrics = parse_masked(masked, FP, 6, ring_dtype(64), head=True)
    assert metrics == head and np.array_equal(got, vector)
    with pytest.raises(AdapterError, match="expected round 0's statistics"):
        parse_masked(masked, FP, 6, ring_dtype(64))
    with pytest.raises(AdapterError, match="expected a head round's"):
        parse_masked(masked_reply(vector, METRICS, FP), FP, 6, ring_dtype(64), head=True)
