"""The Flower ClientApp: glue between messages and the trainer.

Nothing per-client lives in module globals (Ray reuses processes across virtual clients): the
client's identity comes from the context, its spend from its ledger file. Only read-only data is
cached per process.

What leaves: the adapter delta and the few scalars the server needs to weigh and place it (rows,
steps, rank, scale, epsilon spent). Statistics computed on the private data (training loss,
evaluation loss, accuracy, macro-F1 and per-class recall) leave only if the institution opts in
(privacy.release_metrics): they are outside the DP guarantee. A failure leaves as a fixed category
(client.failures).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedlora.client.audit import audit_mod
from fedlora.client.failures import FingerprintMismatch, failure_mod
from fedlora.client.head_rounds import HeadRound, head_round
from fedlora.client.ledger import STATISTICS_ROUND, PrivacyLedger
from fedlora.client.secure_statistics import Sharing, secure_stage, secure_statistics
from fedlora.client.statistics import release_statistics
from fedlora.client.trainer import (
    GradientHook,
    LocalTrainer,
    PrivacyPlan,
    derive_seed,
    privacy_plan,
    private_engine,
    seed_round,
)
from fedlora.common import protocol as P
from fedlora.common.adapter import (
    State,
    adapter_state,
    delta,
    fold_into_base,
    from_record,
    load_adapter_state,
)
from fedlora.common.codec import (
    EvaluateMetrics,
    HeadMetrics,
    TrainMetrics,
    evaluate_reply,
    head_gradient_reply,
    join_reply,
    statistics_reply,
    train_reply,
)
from fedlora.common.config import FedloraConfig, load_config
from fedlora.common.data import DataBundle, TokenizedDataset, build_data
from fedlora.common.distributed_noise import NoiseSharing
from fedlora.common.errors import ConfigError
from fedlora.common.lora_math import dropped_by_truncation, layer_products, truncate_state
from fedlora.common.model import BuiltModel, device_for, load_tokenizer, lora_scale
from fedlora.common.model_pool import borrowed_model
from fedlora.common.scoring import evaluate
from fedlora.common.secure_aggregation.identity import load_identity
from fedlora.common.secure_aggregation.settings import check_statistics_rows, for_head_gradient

log = logging.getLogger("fedlora.client")


class RoundObserver(Protocol):
    """The seam a caller of the ClientApp may hook into one training message: the rows it trains on,
    a gradient hook on its trainer, and the update it sends (before it leaves); in a head round, the
    round's release with its exact clipped sum (which never leaves) and the clip it was made at."""

    def rows(
        self, train: TokenizedDataset, cfg: FedloraConfig, model: nn.Module, vocab_size: int, labels: int
    ) -> TokenizedDataset: ...

    def gradient_hook(self, trainer: LocalTrainer) -> GradientHook | None: ...

    def sent(self, update: State, ledger: PrivacyLedger | None, server_round: int) -> None: ...

    def head_sent(
        self, released: HeadRound, clip: float, ledger: PrivacyLedger | None, server_round: int
    ) -> None: ...


@dataclass(frozen=True)
class ClientSetup:
    """Who this client is for one message: its config, its data and where its ledger lives."""

    cfg: FedloraConfig
    client_id: int
    ledger_path: Path
    rows: tuple[np.ndarray, np.ndarray | None] | None = None
    """Its training and evaluation rows of the data its config names (a simulation's partition);
    None: all of them, as a real institution trains on its own file."""
    audit_path: Path | None = None
    observer: RoundObserver | None = None
    """Its caller's hook into a training message (simulation --audit: the canaries of
    fedlora.simulations.canary_rounds); None for a real institution."""

    @property
    def error_log(self) -> Path:
        """The institution's own log of failures in full, next to its audit log (else its ledger)."""
        beside = self.audit_path or self.ledger_path
        return beside.with_name(f"{beside.stem}-errors.log")


SetupFn = Callable[[Context], ClientSetup]
Handler = Callable[[Message, Context], Message]


@lru_cache(maxsize=2)
def shared_data(cfg: FedloraConfig) -> tuple[PreTrainedTokenizerBase, DataBundle]:
    """Tokenizer and data, cached per process: read-only, so safe to share across virtual clients."""
    tokenizer = load_tokenizer(cfg.model)
    return tokenizer, build_data(cfg, tokenizer)


def forget_shared_data() -> None:
    """Drop the cached tokenizer and data (client.worker: a file the config names changed)."""
    shared_data.cache_clear()


def client_data(setup: ClientSetup) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """This client's training and evaluation rows: all the process's data, or the setup's selection."""
    _, bundle = shared_data(setup.cfg)
    if setup.rows is None:
        return bundle.train, bundle.eval
    train_rows, eval_rows = setup.rows
    ev = bundle.eval.subset(eval_rows) if bundle.eval is not None and eval_rows is not None else None
    return bundle.train.subset(train_rows), ev


def setup_from_node_config(context: Context) -> ClientSetup:
    """Deployment: the institution's own YAML, named in its SuperNode's node config."""
    path = context.node_config.get(P.NODE_CONFIG)
    if not path:
        raise ConfigError("node config: missing 'config' (the institution's YAML path)")
    cfg = load_config(str(path), persona="institution")
    audit = Path(cfg.privacy.audit_log) if cfg.privacy.audit_log else None
    return ClientSetup(
        cfg=cfg, client_id=context.node_id, ledger_path=Path(cfg.privacy.ledger_path), audit_path=audit
    )


def load_global(msg: Message, cfg: FedloraConfig, built: BuiltModel) -> dict[str, torch.Tensor]:
    """Load the global adapter at this client's rank and return what was loaded; refused unless it is
    for this client's base model and layout. Below the global rank, what the truncation drops is
    folded into the frozen base (model.fold_remainder): the client then trains and evaluates the
    whole global model, and still trains and sends only its own rank. The server sends the truncation
    and the dropped part (P.FOLD) once it knows this client's rank; before, the client truncates."""
    config = msg.content[P.CONFIG]
    theirs = config.get(P.FINGERPRINT)
    if theirs != built.fingerprint:
        raise FingerprintMismatch(
            f"global adapter fingerprint {theirs} does not match this client's {built.fingerprint}: "
            "different base model, labels or LoRA layout"
        )
    received = from_record(msg.content[P.ARRAYS])
    server_rank, server_scale = int(config[P.LORA_R]), float(config[P.LORA_SCALE])
    state, dropped = received, {}
    if server_rank != cfg.model.lora_r or server_scale != lora_scale(cfg.model):
        state = truncate_state(received, cfg.model.lora_r, server_scale, lora_scale(cfg.model))
        if server_rank > cfg.model.lora_r:
            dropped = dropped_by_truncation(received, state, server_scale, lora_scale(cfg.model))
    elif P.FOLD in msg.content:
        dropped = layer_products(from_record(msg.content[P.FOLD]), server_scale)
    if cfg.model.fold_remainder and dropped:
        fold_into_base(built.model, dropped)
    load_adapter_state(built.model, state)
    return state


def wire_keys(cfg: FedloraConfig, state: dict[str, torch.Tensor]) -> list[str]:
    """What leaves: the whole adapter, or for FFA-LoRA only B and the head (A is frozen)."""
    return [k for k in state if not (cfg.model.variant == "ffa" and ".lora_A." in k)]


def handle_train(msg: Message, setup: ClientSetup, state: RecordDict | None = None) -> Message:
    """A training message: a LoRA round, or round 0's statistics (under secure aggregation, one step
    of the protocol, whose keys wait in ``state``: the context's, kept by Flower per node)."""
    cfg = setup.cfg
    tokenizer, bundle = shared_data(cfg)
    config = msg.content[P.CONFIG]
    dtype = str(config.get(P.WIRE_DTYPE, "fp32"))
    with borrowed_model(cfg.model, bundle.labels, len(tokenizer)) as built:
        if P.SECAGG_STAGE in config and config.get(P.STAGE) in (P.STATISTICS, P.HEAD_GRADIENT):
            if state is None:
                raise ConfigError("secure aggregation: this ClientApp was given no context state")
            if config.get(P.FINGERPRINT) != built.fingerprint:
                raise FingerprintMismatch(
                    f"secure aggregation: fingerprint {config.get(P.FINGERPRINT)} is not this client's "
                    f"{built.fingerprint}"
                )
            identity = load_identity(cfg.security.identity_key, cfg.security.identity_roster)
            if config.get(P.STAGE) == P.HEAD_GRADIENT:
                content = secure_stage(
                    msg,
                    state,
                    built.fingerprint,
                    identity,
                    for_head_gradient,
                    lambda: planned_head_noise(setup),
                    lambda sharing: secure_head_release(msg, setup, built, sharing),
                )
            else:
                content = secure_statistics(
                    msg,
                    state,
                    built.fingerprint,
                    identity,
                    lambda: planned_statistics_noise(setup, built),
                    lambda sharing: statistics_release(msg, setup, built, sharing),
                )
        elif config.get(P.STAGE) == P.STATISTICS:
            sums, counts, metrics = statistics_release(msg, setup, built)
            content = statistics_reply(sums, counts, metrics, built.fingerprint)
        else:
            content = train_update(msg, setup, built, dtype)
    return Message(content=content, reply_to=msg)


def party_seed(cfg: FedloraConfig, client_id: int, server_round: int) -> int:
    """The seed of this institution's draws in one round (training's shuffle; with
    simulation.reproducible, all of them: trainer.seed_round)."""
    return derive_seed(cfg.training.seed, client_id, server_round)


def statistics_plan(
    setup: ClientSetup, built: BuiltModel
) -> tuple[TokenizedDataset, PrivacyLedger | None, PrivacyPlan]:
    """Round 0's rows, ledger (None without DP) and plan, the planner's statistics noise among it."""
    cfg = setup.cfg
    train, _ = client_data(setup)
    ledger = PrivacyLedger.from_config(cfg.privacy, setup.ledger_path) if cfg.privacy.enabled else None
    if ledger is not None:
        ledger.require_unit(cfg.data.privacy_unit)
    return train, ledger, privacy_plan(cfg, built.model, train, ledger)


def planned_statistics_noise(setup: ClientSetup, built: BuiltModel) -> float:
    """The noise multiplier this institution plans for round 0's release (0 without DP): what its
    secure aggregation advert carries, before anything is released."""
    if not setup.cfg.privacy.enabled:
        return 0.0
    noise = statistics_plan(setup, built)[2].recipe.statistics_noise
    if noise.value is None:
        raise ConfigError(f"statistics: no release planned ({noise.reason})")
    return noise.value


def statistics_release(
    msg: Message, setup: ClientSetup, built: BuiltModel, sharing: NoiseSharing | None = None
) -> tuple[torch.Tensor, torch.Tensor, TrainMetrics]:
    """Round 0: this institution's class statistics, released under the planner's share of its budget
    (client.statistics), charged in its ledger before a row is read; per person with data.privacy_unit
    (each person's rows averaged: the ledger's unit). ``sharing``: its noise is a share of the round's
    agreed noise (secure aggregation, which releases through here too). The noisy sums, counts and the
    reply's metrics."""
    cfg = setup.cfg
    train, ledger, planned = statistics_plan(setup, built)
    if sharing is not None:
        check_statistics_rows(len(train))
    load_global(msg, cfg, built)
    device = device_for(cfg.training.device)
    recipe = planned.recipe
    start = time.perf_counter()
    seed_round(cfg, party_seed(cfg, setup.client_id, STATISTICS_ROUND), STATISTICS_ROUND)
    sums, counts, noise_std, entry = release_statistics(
        built.model.to(device),
        train,
        recipe,
        ledger,
        device,
        cfg.training.eval_batch_size,
        cfg.planned_rounds,
        secure_generator(cfg),
        sharing,
        train.units if planned.units is not None else None,
    )
    persons = f"{planned.units.persons} persons, " if planned.units is not None else ""
    why = recipe.statistics_noise.reason
    log.info("round 0: released class statistics of %s%d rows (%s)", persons, len(train), why)
    metrics = TrainMetrics(
        num_examples=len(train),
        epsilon=entry.epsilon if entry is not None else 0.0,
        lora_r=cfg.model.lora_r,
        lora_scale=lora_scale(cfg.model),
        steps=0,
        train_seconds=time.perf_counter() - start,
        noise_std=noise_std,
    )
    return sums, counts, metrics


def secure_generator(cfg: FedloraConfig) -> torch.Generator | None:
    """privacy.secure_mode: Opacus' secure generator for noise drawn outside its optimizer; else None."""
    return private_engine(cfg.privacy.accountant, True).secure_rng if cfg.privacy.secure_mode else None


@dataclass(frozen=True)
class RoundInputs:
    """What a round's message sets up: the round, the global adapter loaded (as loaded), the rows
    (with the observer's canaries), the ledger (None without DP) and the plan."""

    server_round: int
    start: dict[str, torch.Tensor]
    train: TokenizedDataset
    ledger: PrivacyLedger | None
    planned: PrivacyPlan


def round_inputs(msg: Message, setup: ClientSetup, built: BuiltModel) -> RoundInputs:
    """A round's inputs from its message, for a LoRA or head round, plain or under secure aggregation."""
    cfg = setup.cfg
    tokenizer, bundle = shared_data(cfg)
    train, _ = client_data(setup)
    start = load_global(msg, cfg, built)
    server_round = int(msg.content[P.CONFIG][P.ROUND])
    if setup.observer is not None:
        train = setup.observer.rows(train, cfg, built.model, len(tokenizer), len(bundle.labels))
    ledger = (
        PrivacyLedger.from_config(cfg.privacy, setup.ledger_path, setup.audit_path)
        if cfg.privacy.enabled
        else None
    )
    return RoundInputs(server_round, start, train, ledger, privacy_plan(cfg, built.model, train, ledger))


def train_update(msg: Message, setup: ClientSetup, built: BuiltModel, dtype: str = "fp32") -> RecordDict:
    """This client's round from the global adapter on ``built``, as the planner planned it: a LoRA
    update, an empty one (statistics only), a head round's gradient sum, or (under secure
    aggregation) its joining of the round's secure head sum; the reply's content."""
    cfg = setup.cfg
    inputs = round_inputs(msg, setup, built)
    server_round, start, train, ledger = inputs.server_round, inputs.start, inputs.train, inputs.ledger
    planned = inputs.planned
    observer = setup.observer
    keys = wire_keys(cfg, start)
    recipe = planned.recipe
    if recipe.head_rounds.value and msg.content[P.CONFIG].get(P.SECURE_HEAD):
        log.info("round %d: head round: joining the round's secure sum", server_round)
        return join_reply(built.fingerprint)
    if recipe.head_rounds.value:
        return head_update(setup, built, train, ledger, server_round, planned.cfg.privacy.max_grad_norm)
    if not recipe.fine_tune.value:
        log.info("round %d: not trained: %s", server_round, recipe.fine_tune.reason)
        empty = TrainMetrics(
            num_examples=len(train),
            epsilon=ledger.spent if ledger is not None else 0.0,
            lora_r=cfg.model.lora_r,
            lora_scale=lora_scale(cfg.model),
            steps=0,
            train_seconds=0.0,
        )
        # The plan is a pure function of the config and counts: no later round trains either, and
        # the reply says so (P.STATISTICS_ONLY), so a coordinator whose every institution says it stops.
        update = delta({k: start[k] for k in keys}, start)
        return train_reply(update, empty, built.fingerprint, dtype, P.STATISTICS_ONLY)
    seed = party_seed(cfg, setup.client_id, server_round)
    device = device_for(cfg.training.device)
    trainer = LocalTrainer(cfg, built.model, train, device, ledger, seed=seed, planned=planned)
    with closing(trainer):
        trainer.gradient_hook = observer.gradient_hook(trainer) if observer is not None else None
        mu = float(msg.content[P.CONFIG].get(P.PROXIMAL_MU, 0.0))
        result = trainer.train_round(server_round, proximal_mu=mu, anchor=start, federated=True)
        final = adapter_state(trainer.model)
    update = delta({k: final[k] for k in keys}, start)
    if observer is not None:
        observer.sent(update, ledger, server_round)
    log.info(
        "round %d: trained %d steps, training loss %.4f (kept here)", server_round, result.steps, result.loss
    )
    metrics = TrainMetrics(
        num_examples=result.num_examples,
        epsilon=result.epsilon if result.epsilon is not None else 0.0,
        lora_r=cfg.model.lora_r,
        lora_scale=lora_scale(cfg.model),
        steps=result.steps,
        train_seconds=result.seconds,
        loss=result.loss if cfg.privacy.release_metrics else None,
    )
    return train_reply(update, metrics, built.fingerprint, dtype)


def head_update(
    setup: ClientSetup,
    built: BuiltModel,
    train: TokenizedDataset,
    ledger: PrivacyLedger | None,
    server_round: int,
    clip: float,
) -> RecordDict:
    """A head round (client.head_rounds): charged in the ledger, then the noisy clipped head-gradient
    sum of every row; the LoRA adapter is not trained and no row count leaves."""
    released, metrics = head_release(setup, built, train, ledger, server_round, clip)
    return head_gradient_reply(released.vector, metrics, built.fingerprint)


def head_release(
    setup: ClientSetup,
    built: BuiltModel,
    train: TokenizedDataset,
    ledger: PrivacyLedger | None,
    server_round: int,
    clip: float,
    sharing: NoiseSharing | None = None,
) -> tuple[HeadRound, HeadMetrics]:
    """A head round's release and its reply's metrics, its noise a share of ``sharing`` under secure
    aggregation; the observer (simulation --audit) sees it before it leaves."""
    cfg = setup.cfg
    device = device_for(cfg.training.device)
    start = time.perf_counter()
    seed_round(cfg, party_seed(cfg, setup.client_id, server_round), server_round)
    released = head_round(
        built.model.to(device),
        train,
        ledger,
        server_round,
        clip,
        device,
        cfg.training.eval_batch_size,
        secure_generator(cfg),
        sharing,
    )
    shared = " (its share of the secure sum's)" if sharing is not None else ""
    rows, noise_std = len(train), released.noise_std
    log.info("round %d: head round over %d rows (noise std %.4g%s)", server_round, rows, noise_std, shared)
    if setup.observer is not None:
        setup.observer.head_sent(released, clip, ledger, server_round)
    metrics = HeadMetrics(
        epsilon=released.entry.epsilon if released.entry is not None else 0.0,
        steps=1,
        train_seconds=time.perf_counter() - start,
        noise_std=released.noise_std,
    )
    return released, metrics


def planned_head_noise(setup: ClientSetup) -> float:
    """The noise multiplier this institution plans for a head round (its ledger's, calibrated with round
    0's release; 0 without DP): what its secure aggregation advert carries, before anything is released."""
    if not setup.cfg.privacy.enabled:
        return 0.0
    ledger = PrivacyLedger.from_config(setup.cfg.privacy, setup.ledger_path, setup.audit_path)
    if ledger.noise_multiplier is None:
        raise ConfigError(f"{setup.ledger_path}: a head round before round 0 calibrated the ledger's noise")
    return ledger.noise_multiplier


def secure_head_release(
    msg: Message, setup: ClientSetup, built: BuiltModel, sharing: Sharing
) -> tuple[np.ndarray, HeadMetrics]:
    """A head round's masked input under secure aggregation: the head-gradient sum at the global adapter
    the message carries, with this institution's share of the round's agreed noise, as planned."""
    inputs = round_inputs(msg, setup, built)
    planned, server_round = inputs.planned, inputs.server_round
    if not planned.recipe.head_rounds.value:
        raise ConfigError(
            f"secure aggregation: asked for round {server_round}'s head gradient, but this institution's "
            f"planner plans no head round ({planned.recipe.head_rounds.reason})"
        )
    clip = planned.cfg.privacy.max_grad_norm
    released, metrics = head_release(
        setup, built, inputs.train, inputs.ledger, server_round, clip, sharing(clip)
    )
    return released.vector.to(torch.float64).numpy(), metrics


def handle_evaluate(msg: Message, setup: ClientSetup) -> Message:
    cfg = setup.cfg
    tokenizer, bundle = shared_data(cfg)
    _, ev = client_data(setup)
    if ev is None:
        raise ConfigError("data.eval_path: this client has no evaluation data")
    device = device_for(cfg.training.device)
    with borrowed_model(cfg.model, bundle.labels, len(tokenizer)) as built:
        load_global(msg, cfg, built)
        scores = evaluate(built.model.to(device), cfg.model.task, ev, device, cfg.training.eval_batch_size)
    log.info("evaluation of the global adapter on %d local rows (kept here): %s", len(ev), scores)
    released = cfg.privacy.release_metrics
    recall = {int(k.removeprefix(P.RECALL)): v for k, v in scores.items() if k.startswith(P.RECALL)}
    metrics = EvaluateMetrics(
        num_examples=len(ev),
        loss=scores["loss"] if released else None,
        accuracy=scores.get("accuracy") if released else None,
        macro_f1=scores.get(P.MACRO_F1) if released else None,
        recall=recall if released else {},
    )
    return Message(content=evaluate_reply(metrics), reply_to=msg)


def build_client_app(setup: SetupFn, handle: Handler | None = None, outer: Mod | None = None) -> ClientApp:
    """A ClientApp whose identity and config come from ``setup`` (deployment or simulation). Every
    outgoing message is audited; any failure leaves as a fixed category, its detail kept locally.
    ``handle`` stands in for fedlora's own handlers (client.relay: a worker that cannot be reached);
    ``outer`` wraps all of it (a simulation on a cluster: the institution's files carried to the driver)."""
    client = ClientApp(
        mods=[
            *([outer] if outer else []),
            audit_mod(local_file(setup, lambda s: s.audit_path)),
            failure_mod(local_file(setup, lambda s: s.error_log)),
        ]
    )

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return handle(msg, context) if handle else handle_train(msg, setup(context), context.state)

    @client.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return handle(msg, context) if handle else handle_evaluate(msg, setup(context))

    return client


def local_file(
    setup: SetupFn, pick: Callable[[ClientSetup], Path | None]
) -> Callable[[Context], Path | None]:
    """One of the setup's local files; None when the setup itself fails, as the handler then fails the
    same way and the failure mod reports it (the detail to Python logging only: no file is known)."""

    def path_for(context: Context) -> Path | None:
        try:
            return pick(setup(context))
        except Exception:
            return None

    return path_for


def with_rank(cfg: FedloraConfig, rank: int) -> FedloraConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora_r=rank))


app = build_client_app(setup_from_node_config)
