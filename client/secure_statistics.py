"""Round 0 under secure aggregation (federation.secure_aggregation), the institution's side: one step of
the protocol (common.secure_aggregation.client.ClientRound) per statistics message, in the coordinator's
order: advertise keys, share keys, masked input, consistency check, unmask.

Every step runs under the institution's long-term identity (security.identity_key, checked against
security.identity_roster: common.secure_aggregation.identity): its advert is signed, the roster's adverts
are verified before a share is sealed to anyone, and the unmask is answered only with threshold
signatures over the survivor list it signed. An institution without both keys refuses the round in one
line: against a malicious coordinator, unsigned secure aggregation protects nothing (docs/privacy.md).

The round's private keys and self-mask seed live between messages in the ClientApp's context state
(Flower keeps it per node: a process per message in deployment, any Ray actor in simulation) and are
dropped after the unmask step. The round's noise is agreed before anything is released: each advert
carries the institution's planned round-0 noise multiplier, the roster carries every advertised one, and
sigma is the largest of the verified adverts (so that the sum covers the most private institution's
claim; the release never goes below its own plan, client.statistics), bound into the round's context
from the share-keys step on (common.distributed_noise.agreed_context: institutions shown different
multipliers cannot open each other's shares; each multiplier is signed by its institution). The masked
input is this institution's release with only its share of that noise (common.distributed_noise: std
sigma C / sqrt(m), m = verified institutions - tolerated dropouts - tolerated colluders), class sums and
counts flattened into one vector, quantised into the ring and masked; its ledger records both epsilons
at sigma. A survivor list shorter than the advertised institutions less the tolerated dropouts is
refused: the sum would hold fewer than m shares of noise. The stage handling (``secure_stage``) serves any
release under secure aggregation: a head round's gradient (client.app.secure_head_release) goes through
it too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedlora.common import protocol as P
from fedlora.common.codec import (
    HeadMetrics,
    TrainMetrics,
    advert_arrays,
    advert_reply,
    consistency_reply,
    masked_reply,
    noise_multiplier,
    shares_reply,
    signed_advert,
    unmask_reply,
)
from fedlora.common.distributed_noise import NoiseSharing
from fedlora.common.errors import ConfigError, RoundDiscarded
from fedlora.common.protocol import STATISTICS_SENSITIVITY
from fedlora.common.secure_aggregation.client import ClientRound
from fedlora.common.secure_aggregation.identity import Identity
from fedlora.common.secure_aggregation.messages import SignedAdvert
from fedlora.common.secure_aggregation.settings import SecAggConfig, for_statistics

STATE = "fedlora-secagg"
ROUND = "round"
Plan = Callable[[], float]
"""This institution's planned noise multiplier for the release (0 without DP), the one its advert carries."""
Release = Callable[[NoiseSharing], tuple[torch.Tensor, torch.Tensor, TrainMetrics]]
"""This institution's statistics release with the round's agreed noise shared as given: the noisy
class sums, counts and the reply's metrics."""
Sharing = Callable[[float], NoiseSharing]
"""The round's agreed noise multiplier shared among its roster, at the release's clipping norm."""
Masked = Callable[[Sharing], tuple[np.ndarray, TrainMetrics | HeadMetrics]]
"""Any release under secure aggregation: the vector to mask (with its share of the agreed noise) and
the masked reply's metrics."""


def byte_arrays(record: ArrayRecord) -> dict[str, bytes]:
    """A record of uint8 vectors (keys, sealed shares) as bytes."""
    return {key: array.numpy().astype(np.uint8).tobytes() for key, array in record.items()}


def roster_of(record: ArrayRecord, noises: ConfigRecord | None) -> dict[int, SignedAdvert]:
    """The roster the coordinator sent: each node's signed advert (``<node>/cipher``, ``<node>/mask``,
    ``<node>/identity``, ``<node>/signature``) with its noise multiplier (each checked by the codec's
    rule; a roster node without one, or one of another node, refused in one line)."""
    nodes = sorted({int(key.partition("/")[0]) for key in record})
    noises = noises if noises is not None else ConfigRecord()
    if sorted(noises) != sorted(str(node) for node in nodes):
        raise ConfigError(
            f"secure aggregation: the roster's noise multipliers name nodes {sorted(noises)}, expected "
            f"exactly its institutions {nodes}"
        )
    try:
        return {
            node: signed_advert(
                advert_arrays(record, f"{node}/"),
                noise_multiplier(noises[str(node)], f"roster noise of node {node}"),
            )
            for node in nodes
        }
    except KeyError as err:
        raise ConfigError(f"secure aggregation: the roster lacks {err}") from None


def secure_statistics(
    msg: Message, state: RecordDict, fingerprint: str, identity: Identity, plan: Plan, release: Release
) -> RecordDict:
    """This institution's reply to one stage of round 0 under secure aggregation, signed by
    ``identity``."""

    def vector(sharing: Sharing) -> tuple[np.ndarray, TrainMetrics]:
        sums, counts, metrics = release(sharing(STATISTICS_SENSITIVITY))
        return torch.cat([sums.flatten(), counts]).to(torch.float64).numpy(), metrics

    return secure_stage(msg, state, fingerprint, identity, for_statistics, plan, vector)


def secure_stage(
    msg: Message,
    state: RecordDict,
    fingerprint: str,
    identity: Identity,
    settings_for: Callable[[int | None, int, int], SecAggConfig],
    plan: Plan,
    release: Masked,
) -> RecordDict:
    """This institution's reply to one stage of a secure sum (round 0's statistics, a head round's
    gradient), signed by ``identity``, the protocol's settings from ``settings_for(threshold, dropouts,
    colluders)``."""
    config = msg.content[P.CONFIG]
    stage = str(config.get(P.SECAGG_STAGE))
    node = msg.metadata.dst_node_id
    dropouts, colluders = int(config[P.SECAGG_DROPOUTS]), int(config[P.SECAGG_COLLUDERS])
    settings = settings_for(None, dropouts, colluders)
    if stage == P.ADVERTISE_KEYS:
        round_ = ClientRound(node, settings, bytes(config[P.SECAGG_CONTEXT]), identity)
        content = advert_reply(round_.advertise_keys(plan()), fingerprint)
    else:
        kept = state.config_records.get(STATE)
        if kept is None:
            raise ConfigError(f"secure aggregation: stage {stage} before this node advertised keys")
        round_ = ClientRound.from_bytes(bytes(kept[ROUND]), settings, identity)
        if stage == P.SHARE_KEYS:
            roster = roster_of(msg.content[P.SECAGG_ROSTER], msg.content.config_records.get(P.SECAGG_NOISES))
            content = shares_reply(round_.share_keys(roster, int(config[P.SECAGG_THRESHOLD])), fingerprint)
        elif stage == P.MASKED_INPUT:
            inbox = {int(k): v for k, v in byte_arrays(msg.content[P.SECAGG_INBOX]).items()}
            agreed, sampled = round_.agreed_noise, round_.roster_size
            vector, metrics = release(lambda clip: NoiseSharing(agreed, clip, sampled, dropouts, colluders))
            content = masked_reply(round_.masked_input(inbox, vector), metrics, fingerprint)
        elif stage == P.CONSISTENCY:
            survivors = [int(n) for n in config[P.SECAGG_SURVIVORS]]
            if len(survivors) < round_.roster_size - dropouts:
                del state[STATE]
                raise RoundDiscarded(
                    f"secure aggregation: {len(survivors)} survivors of {round_.roster_size} with "
                    f"{dropouts} tolerated dropouts: the sum would hold too few noise shares; nothing is "
                    "unmasked"
                )
            content = consistency_reply(round_.sign_survivors(survivors), fingerprint)
        elif stage == P.UNMASK:
            del state[STATE]
            signatures = {int(k): v for k, v in byte_arrays(msg.content[P.SECAGG_SIGNATURES]).items()}
            return unmask_reply(round_.unmask(signatures), fingerprint)
        else:
            raise ConfigError(f"secure aggregation: unknown stage {stage!r} (one of {P.SECAGG_STAGES})")
    state[STATE] = ConfigRecord({ROUND: round_.to_bytes()})
    return content
