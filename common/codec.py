"""The one place that builds and parses fedlora's client replies.

A reply comes from a party the coordinator does not control: parsing checks its structure, metric
keys, value types and ranges, and every tensor's key, shape and dtype from the record's metadata and
the npy header *before* decoding anything, so a claimed rank of 1e9 or a huge array never makes the
server allocate. A bad reply raises AdapterError naming what is wrong. Building runs the same checks,
so a client never sends what the coordinator would refuse.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from numpy.lib import format as npy

from fedlora.common import protocol as P
from fedlora.common.adapter import State, non_finite, to_record
from fedlora.common.errors import AdapterError, TrainingDiverged
from fedlora.common.secure_aggregation import identity, keys
from fedlora.common.secure_aggregation.messages import Advert, SignedAdvert, UnmaskShares

_SHOWN = 60
"""Characters of a client's string that a refusal quotes."""
Shape = tuple[int | None, ...]
"""A tensor's expected shape; None where the replying client's own LoRA rank goes."""


@dataclass(frozen=True)
class TrainMetrics:
    """What a train reply says about its round (P.TRAIN_REQUIRED, and the opt-in loss)."""

    num_examples: float
    epsilon: float
    lora_r: int
    lora_scale: float
    steps: int
    train_seconds: float
    loss: float | None = None
    noise_std: float | None = None
    """A statistics reply only: the noise std of its release."""

    def values(self) -> dict[str, float]:
        """The metrics by wire key, without an absent loss or noise std."""
        out = {
            P.NUM_EXAMPLES: self.num_examples,
            P.EPSILON: self.epsilon,
            P.LORA_R: self.lora_r,
            P.LORA_SCALE: self.lora_scale,
            P.STEPS: self.steps,
            P.TRAIN_SECONDS: self.train_seconds,
        }
        if self.loss is not None:
            out[P.LOSS] = self.loss
        if self.noise_std is not None:
            out[P.NOISE_STD] = self.noise_std
        return out


@dataclass(frozen=True)
class EvaluateMetrics:
    """What an evaluate reply says (P.EVALUATE_REQUIRED, and the opt-in loss, accuracy, macro-F1
    and per-class recall by label index)."""

    num_examples: float
    loss: float | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    recall: Mapping[int, float] = field(default_factory=dict)

    def values(self) -> dict[str, float]:
        out: dict[str, float] = {P.NUM_EXAMPLES: self.num_examples}
        for key, value in ((P.LOSS, self.loss), (P.ACCURACY, self.accuracy), (P.MACRO_F1, self.macro_f1)):
            if value is not None:
                out[key] = value
        return out | {f"{P.RECALL}{c}": value for c, value in sorted(self.recall.items())}


@dataclass(frozen=True)
class ReplyRules:
    """What the coordinator accepts in a train reply this round."""

    fingerprint: str
    shapes: Mapping[str, Shape]
    ranks: tuple[int, int]
    scales: tuple[float, float]
    hint: str = ""
    """Appended to a rank or scale refusal: what the institution should change."""


@dataclass(frozen=True)
class TrainReply:
    """A parsed train reply: its metrics and its update (fp32, exactly the expected keys and shapes)."""

    fingerprint: str
    metrics: TrainMetrics
    update: State = field(repr=False)
    plan: str | None = None
    """Why an empty update trained nothing (P.PLAN): P.STATISTICS_ONLY, or None (no reason given)."""


def train_reply(
    update: Mapping[str, torch.Tensor],
    metrics: TrainMetrics,
    fingerprint: str,
    wire_dtype: str = "fp32",
    plan: str | None = None,
) -> RecordDict:
    """The content of a train reply; AdapterError if it holds what a coordinator must refuse
    (TrainingDiverged for a non-finite update). ``plan``: why an update of no steps trained nothing
    (P.STATISTICS_ONLY: the institution's plan trains in no round after round 0), in its config.

    A loss that is NaN (no step produced one) is left out, as an absent statistic."""
    if metrics.loss is not None and math.isnan(metrics.loss):
        metrics = replace(metrics, loss=None)
    config = {P.FINGERPRINT: fingerprint} if plan is None else {P.FINGERPRINT: fingerprint, P.PLAN: plan}
    _train_plan(config, _train_metrics(MetricRecord(metrics.values())))
    bad = non_finite(update)
    if bad:
        raise TrainingDiverged(
            f"{len(bad)} adapter tensors are not finite (first {bad[0]!r}: non-finite values, NaN or inf); "
            "nothing is sent (lower training.learning_rate, model.lora_alpha or privacy.max_grad_norm)"
        )
    return RecordDict(
        {
            P.ARRAYS: to_record(update, wire_dtype),
            P.METRICS: MetricRecord(metrics.values()),
            P.CONFIG: ConfigRecord(config),
        }
    )


@dataclass(frozen=True)
class StatisticsReply:
    """A parsed round-0 statistics reply: its metrics and its (noisy) class sums and counts, fp32."""

    metrics: TrainMetrics
    sums: torch.Tensor = field(repr=False)
    counts: torch.Tensor = field(repr=False)


def statistics_reply(
    sums: torch.Tensor, counts: torch.Tensor, metrics: TrainMetrics, fingerprint: str
) -> RecordDict:
    """The content of a statistics reply: a train reply whose arrays are exactly the class sums and
    counts (fp32), so the audit mod's check of what leaves applies to it unchanged."""
    return train_reply({P.CLASS_SUMS: sums, P.CLASS_COUNTS: counts}, metrics, fingerprint)


def parse_statistics_reply(
    content: RecordDict, fingerprint: str, classes: int, width: int
) -> StatisticsReply:
    """A statistics reply for ``classes`` x ``width`` sums, or AdapterError naming the first thing wrong."""
    metrics, plan = _train_structure(content)
    if plan is not None:
        raise AdapterError(f"config {P.PLAN!r}: a statistics reply is round 0's release, not an empty update")
    theirs = content[P.CONFIG][P.FINGERPRINT]
    if theirs != fingerprint:
        raise AdapterError(f"fingerprint {theirs!r} is not the federation's {fingerprint}")
    if metrics.noise_std is None:
        raise AdapterError(f"metric {P.NOISE_STD!r} missing: a statistics reply says its release's noise")
    shapes = {P.CLASS_SUMS: (classes, width), P.CLASS_COUNTS: (classes,)}
    arrays = decode_arrays(content[P.ARRAYS], shapes)
    return StatisticsReply(metrics, arrays[P.CLASS_SUMS], arrays[P.CLASS_COUNTS])


# --- a head round (client.head_rounds): one flat vector, the noisy clipped head-gradient sum ---


@dataclass(frozen=True)
class HeadMetrics:
    """What a head round's reply says (P.HEAD_REQUIRED): no row count leaves."""

    epsilon: float
    steps: int
    train_seconds: float
    noise_std: float

    def values(self) -> dict[str, float]:
        return {
            P.EPSILON: self.epsilon,
            P.STEPS: self.steps,
            P.TRAIN_SECONDS: self.train_seconds,
            P.NOISE_STD: self.noise_std,
        }


@dataclass(frozen=True)
class HeadReply:
    """A parsed head round's reply: its metrics and its vector (fp32, exactly the expected length)."""

    metrics: HeadMetrics
    vector: torch.Tensor = field(repr=False)


def head_gradient_reply(vector: torch.Tensor, metrics: HeadMetrics, fingerprint: str) -> RecordDict:
    """The content of a head round's reply; TrainingDiverged for a non-finite vector."""
    if not bool(torch.isfinite(vector).all()):
        raise TrainingDiverged(f"{P.HEAD_GRADIENT}: non-finite values (NaN or inf); nothing is sent")
    content = RecordDict(
        {
            P.ARRAYS: to_record({P.HEAD_GRADIENT: vector.reshape(-1)}),
            P.METRICS: MetricRecord(metrics.values()),
            P.CONFIG: ConfigRecord({P.FINGERPRINT: fingerprint, P.STAGE: P.HEAD_GRADIENT}),
        }
    )
    _head_structure(content)
    return content


def is_head_gradient(content: RecordDict) -> bool:
    """Whether a train reply says it is a head round's (its config's stage); the parser checks the rest."""
    config = content.config_records.get(P.CONFIG)
    return config is not None and config.get(P.STAGE) == P.HEAD_GRADIENT


def parse_head_gradient_reply(content: RecordDict, fingerprint: str, values: int) -> HeadReply:
    """A head round's reply of ``values`` values, or AdapterError naming the first thing wrong."""
    metrics = _head_structure(content)
    theirs = content[P.CONFIG][P.FINGERPRINT]
    if theirs != fingerprint:
        raise AdapterError(f"fingerprint {_shown(theirs)} is not the federation's {fingerprint}")
    arrays = decode_arrays(content[P.ARRAYS], {P.HEAD_GRADIENT: (values,)})
    return HeadReply(metrics, arrays[P.HEAD_GRADIENT])


def _head_structure(content: RecordDict) -> HeadMetrics:
    """A head round's reply's records, config (fingerprint and stage alone), dtypes and metrics."""
    _check_records(content, {P.ARRAYS: ArrayRecord, P.METRICS: MetricRecord, P.CONFIG: ConfigRecord})
    config = content[P.CONFIG]
    if set(config) != {P.FINGERPRINT, P.STAGE} or config[P.STAGE] != P.HEAD_GRADIENT:
        raise AdapterError(
            f"config record: {_shown(dict(config))}, expected exactly [{P.FINGERPRINT!r}, {P.STAGE!r}] "
            f"with stage {P.HEAD_GRADIENT!r}"
        )
    for key, array in content[P.ARRAYS].items():
        if array.dtype not in P.REPLY_DTYPES:
            raise AdapterError(
                f"{_shown(key)}: dtype {_shown(array.dtype)}, expected one of {', '.join(P.REPLY_DTYPES)}"
            )
    return _head_metrics(content[P.METRICS])


def _head_metrics(record: MetricRecord) -> HeadMetrics:
    """A head round's metrics (P.HEAD_REQUIRED, each >= 0; steps an integer), plain or masked."""
    values = _check_metrics(record, P.HEAD_REQUIRED, ())
    if not isinstance(values[P.STEPS], int):
        raise AdapterError(f"metric {P.STEPS!r}: {values[P.STEPS]!r}, expected an integer")
    metrics = HeadMetrics(
        epsilon=values[P.EPSILON],
        steps=int(values[P.STEPS]),
        train_seconds=values[P.TRAIN_SECONDS],
        noise_std=values[P.NOISE_STD],
    )
    for key in P.HEAD_REQUIRED:
        _at_least(key, values[key], 0)
    return metrics


# --- round 0 under secure aggregation: one reply per stage of the protocol (common.secure_aggregation) ---
# Keys, sealed shares and Shamir shares travel as uint8 arrays (so the audit log records their sizes, never
# their bytes); the masked vector as ring elements. Its values are masked: only shapes, stage and
# fingerprint can be checked, and the quantisation range bounds what one institution can add.

SECAGG_DTYPES = {
    P.JOIN_SECURE_SUM: ("uint8",),
    P.ADVERTISE_KEYS: ("uint8",),
    P.SHARE_KEYS: ("uint8",),
    P.MASKED_INPUT: ("uint32", "uint64"),
    P.CONSISTENCY: ("uint8",),
    P.UNMASK: ("uint8",),
}


def _as_bytes_array(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8).copy()


def _secagg_reply(
    stage: str,
    arrays: Mapping[str, np.ndarray],
    fingerprint: str,
    metrics: TrainMetrics | HeadMetrics | None = None,
    noise: float | None = None,
) -> RecordDict:
    config = {P.FINGERPRINT: fingerprint, P.SECAGG_STAGE: stage}
    if noise is not None:
        config[P.SECAGG_NOISE] = noise
    if isinstance(metrics, HeadMetrics):
        config[P.STAGE] = P.HEAD_GRADIENT
    content = RecordDict(
        {
            P.ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
            P.CONFIG: ConfigRecord(config),
        }
    )
    if metrics is not None:
        content[P.METRICS] = MetricRecord(metrics.values())
    _secagg_structure(content, stage)
    return content


def noise_multiplier(value: object, where: str) -> float:
    """An advertised round-0 noise multiplier: a finite number >= 0 (0: the institution plans no DP
    noise), else refused in one line naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise AdapterError(
            f"{where}: noise multiplier {_shown(value)}, expected a finite number >= 0 (0: no DP noise)"
        )
    return float(value)


def join_reply(fingerprint: str) -> RecordDict:
    """A head round's answer under secure aggregation (P.SECURE_HEAD): this institution planned a head
    round and joins the round's secure sum; nothing is released or charged yet."""
    return _secagg_reply(P.JOIN_SECURE_SUM, {}, fingerprint)


def is_join(content: RecordDict) -> bool:
    """Whether a train reply says it joins a secure head sum (its config's stage); parse_join checks it."""
    config = content.config_records.get(P.CONFIG)
    return config is not None and config.get(P.SECAGG_STAGE) == P.JOIN_SECURE_SUM


def parse_join(content: RecordDict, fingerprint: str) -> None:
    """A join reply: no arrays, the federation's fingerprint; else AdapterError."""
    record, _ = _secagg_arrays(content, P.JOIN_SECURE_SUM, fingerprint)
    if len(record):
        raise AdapterError(f"keys {_shown(sorted(record))}, expected none in a {P.JOIN_SECURE_SUM} reply")


ADVERT_PARTS = {
    P.CIPHER_KEY: keys.PUBLIC_BYTES,
    P.MASK_KEY: keys.PUBLIC_BYTES,
    P.IDENTITY: identity.PUBLIC_BYTES,
    P.SIGNATURE: identity.SIGNATURE_BYTES,
}


def advert_parts(advert: SignedAdvert) -> dict[str, bytes]:
    """A signed advert's byte fields by their wire names (the reply's, and the roster's per node)."""
    return {
        P.CIPHER_KEY: advert.keys.cipher,
        P.MASK_KEY: advert.keys.mask,
        P.IDENTITY: advert.identity,
        P.SIGNATURE: advert.signature,
    }


def signed_advert(parts: Mapping[str, bytes], noise: float) -> SignedAdvert:
    """The signed advert of ``advert_parts``."""
    keys = Advert(parts[P.CIPHER_KEY], parts[P.MASK_KEY])
    return SignedAdvert(keys, noise, parts[P.IDENTITY], parts[P.SIGNATURE])


def advert_reply(advert: SignedAdvert, fingerprint: str) -> RecordDict:
    """Stage 1: the institution's two public keys of the round and its planned noise multiplier, with
    its long-term identity's signature over them."""
    arrays = {name: _as_bytes_array(raw) for name, raw in advert_parts(advert).items()}
    return _secagg_reply(P.ADVERTISE_KEYS, arrays, fingerprint, noise=advert.noise)


def shares_reply(sealed: Mapping[int, bytes], fingerprint: str) -> RecordDict:
    """Stage 2: the shares sealed to each peer, keyed by the peer's node id."""
    return _secagg_reply(P.SHARE_KEYS, {str(n): _as_bytes_array(c) for n, c in sealed.items()}, fingerprint)


def masked_reply(masked: np.ndarray, metrics: TrainMetrics | HeadMetrics, fingerprint: str) -> RecordDict:
    """Stage 3: the masked, quantised release and the reply's metrics (noise-std: its noise share); a
    head round's (HeadMetrics: no row count) says so in its config (P.STAGE)."""
    return _secagg_reply(P.MASKED_INPUT, {P.MASKED: masked}, fingerprint, metrics)


def consistency_reply(signature: bytes, fingerprint: str) -> RecordDict:
    """Stage 4: the institution's signature over the survivor list it was sent."""
    return _secagg_reply(P.CONSISTENCY, {P.SIGNATURE: _as_bytes_array(signature)}, fingerprint)


def unmask_reply(answer: UnmaskShares, fingerprint: str) -> RecordDict:
    """Stage 5: shares of each survivor's seed and each dropped institution's key."""
    arrays = {f"{P.SEED_SHARE}{n}": _as_bytes_array(v) for n, v in answer.seeds.items()}
    arrays |= {f"{P.KEY_SHARE}{n}": _as_bytes_array(v) for n, v in answer.keys.items()}
    return _secagg_reply(P.UNMASK, arrays, fingerprint)


def _secagg_structure(content: RecordDict, stage: str) -> TrainMetrics | HeadMetrics | None:
    """A secure aggregation reply's records, config (fingerprint and stage; an advert's also its
    noise multiplier, checked; a head round's masked input also its P.STAGE), dtypes and 1-D arrays;
    the masked input's metrics (a head round's without a row count)."""
    if stage not in SECAGG_DTYPES:
        raise AdapterError(
            f"secure aggregation stage {_shown(stage)}, expected one of {', '.join(SECAGG_DTYPES)}"
        )
    records = {P.ARRAYS: ArrayRecord, P.CONFIG: ConfigRecord}
    if stage == P.MASKED_INPUT:
        records[P.METRICS] = MetricRecord
    _check_records(content, records)
    expected = [P.FINGERPRINT, P.SECAGG_STAGE, *([P.SECAGG_NOISE] if stage == P.ADVERTISE_KEYS else [])]
    head = stage == P.MASKED_INPUT and content[P.CONFIG].get(P.STAGE) == P.HEAD_GRADIENT
    expected += [P.STAGE] if head else []
    if set(content[P.CONFIG]) != set(expected):
        raise AdapterError(
            f"config record: keys {_shown(sorted(content[P.CONFIG]))}, expected exactly {expected} "
            f"at stage {stage}"
        )
    if stage == P.ADVERTISE_KEYS:
        noise_multiplier(content[P.CONFIG][P.SECAGG_NOISE], f"config {P.SECAGG_NOISE!r}")
    for key, array in content[P.ARRAYS].items():
        if array.dtype not in SECAGG_DTYPES[stage] or len(array.shape) != 1:
            raise AdapterError(
                f"{_shown(key)}: {_shown(array.dtype)} of shape {_shown(tuple(array.shape))}, expected a "
                f"vector of {', '.join(SECAGG_DTYPES[stage])} at stage {stage}"
            )
    if stage != P.MASKED_INPUT:
        return None
    return _head_metrics(content[P.METRICS]) if head else _train_metrics(content[P.METRICS])


def _secagg_arrays(
    content: RecordDict, stage: str, fingerprint: str
) -> tuple[ArrayRecord, TrainMetrics | HeadMetrics | None]:
    config = content.config_records.get(P.CONFIG)
    theirs = config.get(P.SECAGG_STAGE) if config is not None else None
    if theirs != stage:
        raise AdapterError(f"secure aggregation stage {_shown(theirs)}, expected {stage}")
    metrics = _secagg_structure(content, stage)
    theirs = content[P.CONFIG][P.FINGERPRINT]
    if theirs != fingerprint:
        raise AdapterError(f"fingerprint {_shown(theirs)} is not the federation's {fingerprint}")
    return content[P.ARRAYS], metrics


def _node_of(key: str, prefixes: tuple[str, ...] = ("",)) -> tuple[str, int]:
    """The prefix and node id of a key ``<prefix><decimal node id>``; another key is refused."""
    for prefix in prefixes:
        digits = key.removeprefix(prefix) if key.startswith(prefix) else ""
        if digits.isdecimal() and len(digits) <= 20:
            return prefix, int(digits)
    raise AdapterError(f"unexpected key {_shown(key)}, expected <node id> after one of {prefixes}")


def advert_arrays(record: ArrayRecord, prefix: str = "") -> dict[str, bytes]:
    """A signed advert's byte fields from ``record`` (keys ``<prefix><name>``), each of its size."""
    return {
        name: _payload(prefix + name, record[prefix + name], (size,), ("uint8",)).tobytes()
        for name, size in ADVERT_PARTS.items()
    }


def parse_advert(content: RecordDict, fingerprint: str) -> SignedAdvert:
    """Stage 1's reply: two 32-byte public keys, the planned noise multiplier, the 32-byte identity
    and its 64-byte signature (verified by the state machines, not here)."""
    record, _ = _secagg_arrays(content, P.ADVERTISE_KEYS, fingerprint)
    if set(record) != set(ADVERT_PARTS):
        raise AdapterError(f"keys {_shown(sorted(record))}, expected exactly {sorted(ADVERT_PARTS)}")
    return signed_advert(advert_arrays(record), float(content[P.CONFIG][P.SECAGG_NOISE]))


def parse_consistency(content: RecordDict, fingerprint: str) -> bytes:
    """Stage 4's reply: one 64-byte signature over the survivor list."""
    record, _ = _secagg_arrays(content, P.CONSISTENCY, fingerprint)
    if set(record) != {P.SIGNATURE}:
        raise AdapterError(f"keys {_shown(sorted(record))}, expected exactly [{P.SIGNATURE!r}]")
    return _payload(P.SIGNATURE, record[P.SIGNATURE], (ADVERT_PARTS[P.SIGNATURE],), ("uint8",)).tobytes()


def parse_shares(content: RecordDict, fingerprint: str, max_bytes: int) -> dict[int, bytes]:
    """Stage 2's reply: the sealed shares by receiving node, each at most ``max_bytes``."""
    record, _ = _secagg_arrays(content, P.SHARE_KEYS, fingerprint)
    out = {}
    for key in record:
        _, node = _node_of(key)
        size = record[key].shape[0]
        if size > max_bytes:
            raise AdapterError(f"{key!r}: {size} bytes, expected at most {max_bytes}")
        out[node] = _payload(key, record[key], (size,), ("uint8",)).tobytes()
    return out


def parse_masked(
    content: RecordDict, fingerprint: str, length: int, ring_dtype: np.dtype, head: bool = False
) -> tuple[np.ndarray, TrainMetrics | HeadMetrics]:
    """Stage 3's reply: a masked vector of ``length`` ring elements, and the reply's metrics; ``head``:
    a head round's (HeadMetrics), else round 0's statistics (TrainMetrics)."""
    record, metrics = _secagg_arrays(content, P.MASKED_INPUT, fingerprint)
    if set(record) != {P.MASKED}:
        raise AdapterError(f"keys {_shown(sorted(record))}, expected exactly [{P.MASKED!r}]")
    if isinstance(metrics, HeadMetrics) != head:
        expected = "a head round's" if head else "round 0's statistics"
        raise AdapterError(f"a masked reply of another release, expected {expected}")
    if metrics is None or metrics.noise_std is None:
        raise AdapterError(f"metric {P.NOISE_STD!r} missing: a statistics reply says its release's noise")
    return _payload(P.MASKED, record[P.MASKED], (length,), (str(ring_dtype),)).copy(), metrics


def parse_unmask(content: RecordDict, fingerprint: str, share_bytes: int) -> UnmaskShares:
    """Stage 4's reply: shares of ``share_bytes`` by node, seeds and keys apart."""
    record, _ = _secagg_arrays(content, P.UNMASK, fingerprint)
    parts: dict[str, dict[int, bytes]] = {P.SEED_SHARE: {}, P.KEY_SHARE: {}}
    for key in record:
        prefix, node = _node_of(key, tuple(parts))
        parts[prefix][node] = _payload(key, record[key], (share_bytes,), ("uint8",)).tobytes()
    return UnmaskShares(seeds=parts[P.SEED_SHARE], keys=parts[P.KEY_SHARE])


def evaluate_reply(metrics: EvaluateMetrics) -> RecordDict:
    """The content of an evaluate reply; AdapterError if it holds what a coordinator must refuse."""
    record = MetricRecord(metrics.values())
    _evaluate_metrics(record)
    return RecordDict({P.METRICS: record})


def parse_train_reply(content: RecordDict, rules: ReplyRules) -> TrainReply:
    """A train reply checked against ``rules``, or AdapterError naming the first thing wrong."""
    metrics, plan = _train_structure(content)
    theirs = content[P.CONFIG][P.FINGERPRINT]
    if theirs != rules.fingerprint:
        raise AdapterError(f"fingerprint {_shown(theirs)} is not the federation's {rules.fingerprint}")
    _check_layout(metrics, rules)
    shapes = {
        key: tuple(metrics.lora_r if dim is None else dim for dim in shape)
        for key, shape in rules.shapes.items()
    }
    return TrainReply(theirs, metrics, decode_arrays(content[P.ARRAYS], shapes), plan)


def parse_evaluate_reply(content: RecordDict) -> EvaluateMetrics:
    """An evaluate reply's metrics, or AdapterError naming the first thing wrong."""
    _check_records(content, {P.METRICS: MetricRecord})
    return _evaluate_metrics(content[P.METRICS])


def check_outgoing(content: RecordDict, message_type: str) -> None:
    """What a client is about to send is exactly a codec reply (records, config, metrics, dtypes); the
    audit mod calls this, so no other code path can make anything else leave the institution."""
    if message_type == "evaluate":
        parse_evaluate_reply(content)
        return
    if message_type != "train":
        raise AdapterError(f"a {message_type!r} reply: clients send only train and evaluate replies")
    config = content.config_records.get(P.CONFIG)
    if config is not None and P.SECAGG_STAGE in config:
        _secagg_structure(content, str(config[P.SECAGG_STAGE]))
        return
    if is_head_gradient(content):
        _head_structure(content)
        return
    _train_structure(content)
    for key, array in content[P.ARRAYS].items():
        if array.dtype not in P.REPLY_DTYPES:
            raise AdapterError(f"{key!r}: dtype {array.dtype!r}, expected one of {', '.join(P.REPLY_DTYPES)}")


def decode_arrays(record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]]) -> State:
    """Exactly ``shapes``' keys as fp32 tensors; every shape and dtype checked before decoding."""
    missing = sorted(set(shapes) - set(record))
    if missing:
        raise AdapterError(f"missing key {missing[0]!r} ({len(missing)} missing)")
    extra = sorted(set(record) - set(shapes))
    if extra:
        raise AdapterError(f"unexpected key {_shown(extra[0])} ({len(extra)} unexpected)")
    state = {key: _decode(key, record[key], shapes[key]) for key in shapes}
    bad = non_finite(state)
    if bad:
        raise AdapterError(f"{bad[0]!r}: non-finite values (NaN or inf)")
    return state


def _shown(value: object, limit: int = _SHOWN) -> str:
    """``repr(value)`` of something a client chose (a key, a fingerprint), cut to ``limit`` characters
    with a marker: a refusal quotes it, and the coordinator keeps its refusals."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... [{len(text)} characters]"


def _decode(key: str, array: Array, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(_payload(key, array, shape, P.REPLY_DTYPES).astype(np.float32))


def _payload(key: str, array: Array, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> np.ndarray:
    """The array's values, its dtype, shape, npy header and byte count checked before reading."""
    if array.dtype not in dtypes:
        raise AdapterError(f"{key!r}: dtype {_shown(array.dtype)}, expected one of {', '.join(dtypes)}")
    if tuple(array.shape) != shape:
        raise AdapterError(f"{key!r}: shape {_shown(tuple(array.shape))}, expected {shape}")
    data = array.data if isinstance(array.data, bytes) else b""
    buffer = io.BytesIO(data)
    try:
        version = npy.read_magic(buffer)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        header_shape, fortran, dtype = read_header(buffer)
    except (ValueError, TypeError) as err:
        raise AdapterError(f"{key!r}: not a numpy array ({_shown(str(err))})") from None
    if header_shape != shape or dtype != np.dtype(array.dtype) or fortran:
        raise AdapterError(
            f"{key!r}: payload holds {dtype} {header_shape}, its metadata says {array.dtype} {shape}"
        )
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - buffer.tell() != expected:
        raise AdapterError(f"{key!r}: {len(data) - buffer.tell()} payload bytes, expected {expected}")
    return np.frombuffer(data, dtype=dtype, offset=buffer.tell()).reshape(shape)


def _train_structure(content: RecordDict) -> tuple[TrainMetrics, str | None]:
    """A train reply's records, its config record (the fingerprint, and for an empty update perhaps
    why: P.PLAN), its metrics, and that reason (None: none given)."""
    _check_records(content, {P.ARRAYS: ArrayRecord, P.METRICS: MetricRecord, P.CONFIG: ConfigRecord})
    metrics = _train_metrics(content[P.METRICS])
    return metrics, _train_plan(content[P.CONFIG], metrics)


def _train_plan(config: Mapping[str, object], metrics: TrainMetrics) -> str | None:
    """A train reply's config: the fingerprint, and P.PLAN only as P.STATISTICS_ONLY on a reply of no
    steps (a coordinator stops a federation on it: a reply that trained cannot claim it)."""
    if set(config) - {P.PLAN} != {P.FINGERPRINT}:
        raise AdapterError(
            f"config record: keys {_shown(sorted(config))}, expected [{P.FINGERPRINT!r}] and perhaps "
            f"{P.PLAN!r}"
        )
    plan = config.get(P.PLAN)
    if plan is None:
        return None
    if plan != P.STATISTICS_ONLY:
        raise AdapterError(f"config {P.PLAN!r}: {_shown(plan)}, expected {P.STATISTICS_ONLY!r}")
    if metrics.steps != 0:
        raise AdapterError(
            f"config {P.PLAN!r}: {P.STATISTICS_ONLY!r} on a reply of {metrics.steps} steps, expected 0"
        )
    return P.STATISTICS_ONLY


def _check_records(content: RecordDict, expected: Mapping[str, type]) -> None:
    names = sorted(content)
    if names != sorted(expected):
        raise AdapterError(f"records {_shown(names)}, expected exactly {sorted(expected)}")
    for name, kind in expected.items():
        if not isinstance(content[name], kind):
            raise AdapterError(
                f"record {name!r} is a {type(content[name]).__name__}, expected {kind.__name__}"
            )


def _check_metrics(
    record: MetricRecord, required: tuple[str, ...], optional: tuple[str, ...]
) -> dict[str, int | float]:
    """The metrics as scalars: exactly the required keys plus known optional ones, each finite."""
    missing = [key for key in required if key not in record]
    if missing:
        raise AdapterError(f"metric {missing[0]!r} missing")
    extra = sorted(set(record) - set(required) - set(optional))
    if extra:
        raise AdapterError(
            f"unexpected metric {_shown(extra[0])} (known: {', '.join((*required, *optional))})"
        )
    values: dict[str, int | float] = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise AdapterError(f"metric {key!r}: {_shown(value)}, expected a single number")
        if not math.isfinite(value):
            raise AdapterError(f"metric {key!r}: {value!r}, expected a finite number")
        values[key] = value
    return values


def _train_metrics(record: MetricRecord) -> TrainMetrics:
    values = _check_metrics(record, P.TRAIN_REQUIRED, P.TRAIN_OPTIONAL)
    for key in (P.LORA_R, P.STEPS):
        if not isinstance(values[key], int):
            raise AdapterError(f"metric {key!r}: {values[key]!r}, expected an integer")
    m = TrainMetrics(
        num_examples=values[P.NUM_EXAMPLES],
        epsilon=values[P.EPSILON],
        lora_r=int(values[P.LORA_R]),
        lora_scale=values[P.LORA_SCALE],
        steps=int(values[P.STEPS]),
        train_seconds=values[P.TRAIN_SECONDS],
        loss=values.get(P.LOSS),
        noise_std=values.get(P.NOISE_STD),
    )
    _at_least(P.NUM_EXAMPLES, m.num_examples, 1)
    _at_least(P.EPSILON, m.epsilon, 0)
    _at_least(P.LORA_R, m.lora_r, 1)
    _at_least(P.STEPS, m.steps, 0)
    _at_least(P.TRAIN_SECONDS, m.train_seconds, 0)
    if m.noise_std is not None:
        _at_least(P.NOISE_STD, m.noise_std, 0)
    if not m.lora_scale > 0:
        raise AdapterError(f"metric {P.LORA_SCALE!r}: {m.lora_scale!r}, expected > 0")
    return m


def _check_layout(m: TrainMetrics, rules: ReplyRules) -> None:
    """Rank and scale within what the coordinator allows (checked before anything is allocated)."""
    for key, value, (low, high) in (
        (P.LORA_R, m.lora_r, rules.ranks),
        (P.LORA_SCALE, m.lora_scale, rules.scales),
    ):
        if not low <= value <= high:
            allowed = f"only {low:g}" if low == high else f"{low:g} to {high:g}"
            raise AdapterError(f"metric {key!r}: {value:g}, the coordinator allows {allowed}{rules.hint}")


def _evaluate_metrics(record: MetricRecord) -> EvaluateMetrics:
    recall_keys = tuple(k for k in record if k.startswith(P.RECALL))
    for key in recall_keys:
        index = key.removeprefix(P.RECALL)
        if not (index.isascii() and index.isdigit() and str(int(index)) == index):
            raise AdapterError(f"unexpected metric {key!r} (per-class recall is {P.RECALL}<label index>)")
    values = _check_metrics(record, P.EVALUATE_REQUIRED, P.EVALUATE_OPTIONAL + recall_keys)
    metrics = EvaluateMetrics(
        values[P.NUM_EXAMPLES],
        values.get(P.LOSS),
        values.get(P.ACCURACY),
        values.get(P.MACRO_F1),
        {int(k.removeprefix(P.RECALL)): values[k] for k in recall_keys},
    )
    _at_least(P.NUM_EXAMPLES, metrics.num_examples, 1)
    if metrics.loss is not None:
        _at_least(P.LOSS, metrics.loss, 0)
    shares = {P.ACCURACY: metrics.accuracy, P.MACRO_F1: metrics.macro_f1}
    shares |= {k: values[k] for k in recall_keys}
    for key, value in shares.items():
        if value is not None and not 0 <= value <= 1:
            raise AdapterError(f"metric {key!r}: {value!r}, expected between 0 and 1")
    return metrics


def _at_least(key: str, value: float, low: float) -> None:
    if not value >= low:
        raise AdapterError(f"metric {key!r}: {value!r}, expected >= {low}")
