"""Local fine-tuning of the LoRA parameters only, with DP-SGD (Opacus) or without (baselines).

One trainer holds one model and, in DP mode, one Opacus wrapper for its whole life: Opacus refuses to
wrap a module twice. A round's spend is reserved in the ledger before its first step, so no example
is touched, and no update leaves, without its privacy cost on disk. With data.privacy_unit the unit
DP-SGD samples and clips is the person (client.privacy_unit), and every count it plans from is persons.
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.grad_sample import AbstractGradSampleModule
from torch import nn
from torch.utils.data import DataLoader

from fedlora.client.ledger import PrivacyLedger, require_meaningful_delta
from fedlora.client.privacy_unit import PersonRows, UnitCounts, group_by_person, unit_counts
from fedlora.client.recipe import Recipe, applied, facts, plan, poisson_rate
from fedlora.client.statistics import head_rows, head_values
from fedlora.common.adapter import State, peft_module, peft_state
from fedlora.common.config import FedloraConfig
from fedlora.common.data import TokenizedDataset
from fedlora.common.errors import ConfigError
from fedlora.common.model import HEAD
from fedlora.common.notices import without_notices
from fedlora.common.scoring import forward_loss, trim

StepCallback = Callable[[int, float], None]


class GradientHook(Protocol):
    """Called around every optimizer step with the trained parameters by adapter key: before (the
    batch's per-sample gradients, or the gradients without DP, may be added to), and after (the
    gradient the step used, noise included, may be read); under DP also before Opacus clips and sums
    each slice of a batch but its last (training.physical_batch_size), whose per-sample gradients
    it then frees."""

    def before_partial_sum(self, params: dict[str, nn.Parameter]) -> None: ...

    def before_step(self, params: dict[str, nn.Parameter]) -> None: ...

    def after_step(self, params: dict[str, nn.Parameter]) -> None: ...


# Known, understood notices, silenced only around the calls that raise them: Opacus' secure-RNG
# advice (privacy.secure_mode decides, see the README) and torch's remark that frozen inputs fire
# full backward hooks (Opacus relies on exactly that).
_SECURE_RNG_OFF = "Secure RNG turned off"
_FULL_BACKWARD_HOOK = "Full backward hook is firing"
# And Opacus' log line when Poisson sampling's first batch of a loader is empty: ``_step`` runs that
# step as a real DP step on an empty batch (noise only), so it is no news; on a command's stderr it
# broke the one-line error convention.
_EMPTY_FIRST_BATCH = "First batch is empty"
_OPACUS_LOADER_LOG = logging.getLogger("opacus.data_loader")


@dataclass(frozen=True)
class RoundResult:
    num_examples: int
    steps: int
    loss: float
    epsilon: float | None
    noise_multiplier: float | None
    sample_rate: float
    seconds: float
    examples_seen: int

    @property
    def examples_per_second(self) -> float:
        return self.examples_seen / self.seconds if self.seconds > 0 else 0.0


def _endless(loader: DataLoader) -> Iterator[tuple[torch.Tensor, ...]]:
    """Batches forever; a function of the loader, not a method, so that the suspended generator
    does not hold the trainer in a reference cycle."""
    for _ in itertools.count():
        yield from loader


def derive_seed(*parts: int) -> int:
    """One seed from several integers: numpy's SeedSequence mixes them, so that neighbouring inputs
    (client 1 and 2, round 3 and 4) give unrelated streams."""
    return int(np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def seed_round(cfg: FedloraConfig, seed: int, round_id: int) -> None:
    """simulation.reproducible (research only) seeds torch's RNG before a round's draws, so all of them,
    the round-0 release's noise, Poisson sampling, Opacus' noise and dropout alike, are replayed by a
    run with the same simulation.seed and party seed (the ClientApp's: training.seed, client and
    round). Without it nothing is seeded: DP draws from the unseeded RNG."""
    if cfg.simulation.reproducible:
        torch.manual_seed(derive_seed(cfg.simulation.seed, seed, round_id))


def trained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters training changes, by their key in PEFT's own adapter state dict (whose tensors
    share their storage)."""
    keys = {t.data_ptr(): k for k, t in peft_state(model).items()}
    return {keys[p.data_ptr()]: p for p in model.parameters() if p.requires_grad and p.data_ptr() in keys}


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Hugging Face's reentrant checkpointing: its first forward runs without autograd, so Opacus'
    hooks capture each layer's input once, in the recomputation (non-reentrant checkpointing
    recomputes with autograd on and Opacus would capture every input twice). Reentrant checkpointing
    needs an input that requires grad: Hugging Face makes the embeddings' output require it."""
    base = peft_module(model).get_base_model()
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"training.gradient_checkpointing: {type(base).__name__} does not support it; set it to false"
        )
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})


def private_engine(accountant: str, secure_mode: bool) -> PrivacyEngine:
    """Opacus' engine; ``secure_mode`` draws noise and Poisson samples from a cryptographically
    secure generator (torchcsprng), as production should."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SECURE_RNG_OFF)
        try:
            return PrivacyEngine(accountant=accountant, secure_mode=secure_mode)
        except ImportError:
            raise ConfigError(
                "privacy.secure_mode: true needs the torchcsprng package, which is not installed; install "
                "it or set privacy.secure_mode: false (experiments only)"
            ) from None


@dataclass(frozen=True)
class PrivacyPlan:
    """What this institution trains under, planned once from its counts and its ledger's state:
    ``fedlora-client check`` prints it and the trainer runs it, so the two cannot drift apart."""

    recipe: Recipe
    cfg: FedloraConfig
    """The config with the recipe's values applied."""
    units: UnitCounts | None
    """Its persons with data.privacy_unit under DP (what DP-SGD samples and clips), else None."""
    sampled: int
    """What Poisson sampling draws from: persons with ``units``, else rows."""
    sample_rate: float
    noise_multiplier: float | None
    """The ledger's noise for the planned rounds (None without DP, or without a ledger)."""


def privacy_plan(
    cfg: FedloraConfig,
    model: nn.Module,
    train: TokenizedDataset,
    ledger: PrivacyLedger | None,
    round_zero: bool = True,
) -> PrivacyPlan:
    """The plan for ``train`` on ``model``: persons, delta and the ledger's unit checked, the
    planner's recipe (client.recipe: the values the config leaves unset, and whether it fine-tunes at
    all) and, with a ledger, the noise it calibrates for the planned rounds; ``round_zero`` False
    where no federation's round 0 releases statistics first (train-local: the rounds get the whole
    budget)."""
    private = cfg.privacy.enabled
    units = None
    if private and cfg.data.privacy_unit is not None:
        if train.units is None:
            raise ConfigError(
                f"data.privacy_unit: '{cfg.data.privacy_unit}' is set but the rows carry no person"
            )
        units = unit_counts(train.units, cfg.data.max_rows_per_unit)
    sampled, noun = (units.persons, "persons") if units is not None else (len(train), "rows")
    if private:
        require_meaningful_delta(cfg.privacy.delta, sampled, noun)
    private_ledger = ledger if private else None
    if private_ledger is not None:
        private_ledger.require_unit(cfg.data.privacy_unit)
    fixed = private_ledger.noise_multiplier if private_ledger is not None else None
    persons = (units.persons, units.rows_per_person) if units is not None else (None, 1.0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inst = facts(
        cfg,
        len(train),
        head_rows(model),
        *persons,
        trainable=trainable,
        round_zero=round_zero,
        head_values=head_values(model),
    )
    recipe = plan(inst, cfg, fixed)
    cfg = applied(cfg, recipe)
    noise = None
    if private_ledger is not None:
        noise = private_ledger.calibrate(*recipe.calibration(cfg.planned_rounds))
    return PrivacyPlan(
        recipe=recipe,
        cfg=cfg,
        units=units,
        sampled=sampled,
        sample_rate=poisson_rate(sampled, cfg.training.batch_size),
        noise_multiplier=noise,
    )


class LocalTrainer:
    def __init__(
        self,
        cfg: FedloraConfig,
        model: nn.Module,
        train: TokenizedDataset,
        device: torch.device,
        ledger: PrivacyLedger | None = None,
        seed: int | None = None,
        planned: PrivacyPlan | None = None,
        round_zero: bool = True,
    ) -> None:
        """``planned``: the caller's privacy_plan for this model, data and ledger (else made here, with
        ``round_zero`` False where no round 0 releases statistics before these rounds: train-local)."""
        if cfg.privacy.enabled and ledger is None:
            raise ConfigError("privacy.enabled: DP training needs a privacy ledger")
        if (
            cfg.privacy.enabled
            and cfg.privacy.grad_sample_mode == "ghost"
            and (cfg.model.task != "classification")
        ):
            raise ConfigError("privacy.grad_sample_mode: 'ghost' is supported for classification only")
        # data.privacy_unit: DP-SGD samples persons and clips one gradient each (client.privacy_unit).
        self.plan = planned if planned is not None else privacy_plan(cfg, model, train, ledger, round_zero)
        self.units: UnitCounts | None = self.plan.units
        self.recipe: Recipe = self.plan.recipe
        cfg = self.plan.cfg
        self.cfg = cfg
        self.task = cfg.model.task
        self.device = device
        self.ledger = ledger
        self.train_set = train
        self.sample_rate = self.plan.sample_rate
        # What Opacus' mean divides each step's noisy sum by (its make_private computes the same).
        self.expected_batch = int(self.plan.sampled * self.sample_rate)
        # DP: Poisson sampling must be unpredictable (privacy amplification assumes it), so it draws
        # from torch's unseeded RNG; only non-private baselines shuffle reproducibly, and research
        # simulations with simulation.reproducible seed each round (seed_round).
        private = cfg.privacy.enabled
        self.seed = cfg.training.seed if seed is None else seed
        self.generator = None if private else torch.Generator().manual_seed(self.seed)
        self.model = model.to(device)
        self.model.train()
        if cfg.training.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self._trained = trained_parameters(self.model)
        self._state_keys = {id(param): key for key, param in self._trained.items()}
        # The privacy audit's white-box canaries (client.canaries): called on the batch's gradients.
        self.gradient_hook: GradientHook | None = None
        self.optimizer = torch.optim.AdamW(self._param_groups(), weight_decay=cfg.training.weight_decay)
        if self.units is not None:
            loader = PersonRows(train, cfg.data.max_rows_per_unit).loader(cfg.training.batch_size)
        else:
            loader = DataLoader(
                train, batch_size=cfg.training.batch_size, shuffle=True, generator=self.generator
            )
        self.criterion: nn.Module | None = None
        self.noise_multiplier: float | None = None
        if cfg.privacy.enabled:
            self._make_private(loader)
        else:
            self.loader = loader
        self._batches = _endless(self.loader)

    def _param_groups(self) -> list[dict]:
        head, lora = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (head if f".{HEAD}." in name else lora).append(param)
        head_lr = self.cfg.training.head_learning_rate or self.cfg.training.learning_rate
        groups = [{"params": lora, "lr": self.cfg.training.learning_rate}]
        if head:
            groups.append({"params": head, "lr": head_lr})
        return groups

    def _make_private(self, loader: DataLoader) -> None:
        privacy = self.cfg.privacy
        self.noise_multiplier = self.plan.noise_multiplier
        engine = private_engine(privacy.accountant, privacy.secure_mode)
        mode = privacy.grad_sample_mode
        kwargs = {"criterion": nn.CrossEntropyLoss()} if mode == "ghost" else {}
        wrapped = engine.make_private(
            module=self.model,
            optimizer=self.optimizer,
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=mode,
            **kwargs,
        )
        if mode == "ghost":
            self.model, self.optimizer, self.criterion, self.loader = wrapped
        else:
            self.model, self.optimizer, self.loader = wrapped

    def _next_batch(self) -> tuple[torch.Tensor, ...]:
        with without_notices(_OPACUS_LOADER_LOG, _EMPTY_FIRST_BATCH):
            return next(self._batches)

    def _step(self, batch: tuple[torch.Tensor, ...]) -> float | None:
        """One optimizer step on one (logical) batch, forward and backward in slices of at most
        training.physical_batch_size examples (see ``_accumulate``)."""
        self.optimizer.zero_grad(set_to_none=True)
        if len(batch[0]) == 0:
            # Poisson sampling drew nobody: no forward pass (Hugging Face models crash on empty
            # batches), but the step still runs so that noise is added and the step accounted.
            for param in self.optimizer.params:
                if self.criterion is None:
                    param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
                else:
                    param.grad = torch.zeros_like(param)
            self._optimizer_step()
            return None
        # data.privacy_unit: each row's person, for grouping (config refuses slices with a unit).
        owner = batch[3] if self.units is not None else None
        batch = batch[:3]
        size = self.cfg.training.physical_batch_size or len(batch[0])
        summed_loss = 0.0
        for start in range(0, len(batch[0]), size):
            part = tuple(t[start : start + size] for t in batch)
            summed_loss += self._backward(part, len(batch[0]), owner) * len(part[0])
            if start + size < len(batch[0]):
                self._accumulate()
        self._optimizer_step()
        return summed_loss / len(batch[0])

    def _backward(self, part: tuple[torch.Tensor, ...], batch_rows: int, owner: torch.Tensor | None) -> float:
        """Forward and backward of one slice; returns its mean loss. With ``owner`` (the person of each
        row) the per-row gradients become per-person means (client.privacy_unit)."""
        part = tuple(t.to(self.device) for t in trim(part))
        if self.criterion is not None:
            logits = self.model(input_ids=part[0], attention_mask=part[1])
            loss = self.criterion(logits, part[2])
        else:
            loss, _ = forward_loss(self.model, self.task, part)
        # DP: Opacus scales each slice's per-example gradients by the slice's own size (a mean loss),
        # so they are exact as they are; without DP the slices' means are weighted into the batch's.
        scaled = loss if self.cfg.privacy.enabled else loss * (len(part[0]) / batch_rows)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_FULL_BACKWARD_HOOK)
            scaled.backward()
        if owner is not None:
            group_by_person(self.optimizer.params, owner)
        return float(loss.detach())

    def _accumulate(self) -> None:
        """Between slices under DP: Opacus clips this slice's per-example gradients and adds them to
        the batch's sum, then frees them (a skipped step: no noise, no accounting, no update); the
        batch's last slice takes the real step. Without DP, gradients simply add up."""
        if not self.cfg.privacy.enabled:
            return
        if self.gradient_hook is not None:
            self.gradient_hook.before_partial_sum(self._trained)
        self.optimizer.signal_skip_step(do_skip=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _optimizer_step(self) -> None:
        if self.gradient_hook is not None:
            self.gradient_hook.before_step(self._trained)
        self.optimizer.step()
        if self.gradient_hook is not None:
            self.gradient_hook.after_step(self._trained)

    def _proximal_pull(self, mu: float, anchor: State) -> None:
        """FedProx's term as a step toward the round's start after each DP step: it touches no
        data, so it is post-processing and costs no privacy."""
        with torch.no_grad():
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    key = self._state_keys.get(id(param))
                    if key in anchor:
                        param.sub_(group["lr"] * mu * (param - anchor[key].to(param.device)))

    def train_round(
        self,
        round_id: int,
        steps: int | None = None,
        on_step: StepCallback | None = None,
        proximal_mu: float = 0.0,
        anchor: State | None = None,
        federated: bool = False,
    ) -> RoundResult:
        """Run ``steps`` optimizer steps; in DP mode, reserve their spend first (BudgetExceeded if the
        budget can't pay for them: nothing trained). ``federated``: the federation's round
        ``round_id`` (the ClientApp), whose unreleased reservation a resumed run reuses."""
        steps = self.cfg.training.local_steps if steps is None else steps
        spends = self.ledger is not None and steps > 0
        epsilon = self._reserve(round_id, steps, federated) if spends else None
        self.model.train()
        start, losses, seen = time.perf_counter(), [], 0
        seed_round(self.cfg, self.seed, round_id)
        for step in range(steps):
            batch = self._next_batch()
            seen += len(batch[0])
            loss = self._step(batch)
            if proximal_mu > 0 and anchor is not None:
                self._proximal_pull(proximal_mu, anchor)
            if loss is not None:
                losses.append(loss)
            if on_step is not None:
                on_step(step + 1, loss if loss is not None else float("nan"))
        seconds = time.perf_counter() - start
        return RoundResult(
            num_examples=len(self.train_set),
            steps=steps,
            loss=sum(losses) / len(losses) if losses else float("nan"),
            epsilon=epsilon,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            seconds=seconds,
            examples_seen=seen,
        )

    def _reserve(self, round_id: int, steps: int, federated: bool) -> float:
        """The ledger's noise rules: another process may have recorded its calibration first."""
        entry = self.ledger.reserve(round_id, self.sample_rate, steps, federated=federated)
        if entry.noise_multiplier != self.noise_multiplier:
            self.noise_multiplier = self.optimizer.noise_multiplier = entry.noise_multiplier
        return entry.epsilon

    def close(self) -> None:
        """Remove Opacus' hooks: they are bound methods of its wrapper, stored on the wrapped modules,
        a reference cycle that would keep this trainer's model, optimizer state and per-sample
        gradients until Python's next full garbage collection (rare in a big process; in simulations,
        where the ClientApp makes a trainer per message, memory would grow every round)."""
        if isinstance(self.model, AbstractGradSampleModule):
            self.model.to_standard_module()
