"""The recipe planner: DP fine-tuning settings from what an institution knows before training.

Pure: it reads counts the institution already holds (rows, labels), its budget and plan, and its
compute budget; it never looks at a row, so planning spends no privacy and nothing leaves. Every
value comes with a one-line reason naming its rule and source:

- batch and steps: Ponomareva et al. 2023, "How to DP-fy ML" (fix the steps, then the largest batch
  the compute allows) and Li et al. 2022, "Large Language Models Can Be Strong Differentially Private
  Learners" (large batches, few steps): batch = min(rows, examples_per_round / MIN_STEPS), steps =
  examples_per_round / batch, at most MAX_STEPS.
- noise: calibrated by the institution's accountant so that the head start and every planned step
  together spend exactly the budget (client.ledger.calibrate_noise).
- clipping: Li et al. 2022: a small norm clips every example; Adam's update is then independent of
  the norm's scale, so CLIP only has to be below the per-example gradient norms.
- learning rates: Li et al. 2022: the rate grows with the batch; linear in the expected batch,
  anchored at the hand-tuned drug-review preset (REFERENCE_*), at most MAX_LR_SCALE times it.
- head start: Tramer & Boneh 2021, "Differentially Private Learning Needs Better Features" (a linear
  model on good features is a strong DP baseline) and Kumar et al. 2022, "Fine-Tuning can Distort
  Pretrained Features" (linear probe, then fine-tune): start from the data's noisy class means
  (client.head_start) when the expected rows per class carry more signal on a logit than the
  release's noise (ASSUMED_GAP x rows / labels >= MIN_SIGNAL_TO_NOISE x noise), else from the
  label names, which are free. The release takes HEAD_START_SHARE of the budget on its own.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from fedlora.client.ledger import calibrate_noise
from fedlora.common.config import FedloraConfig
from fedlora.common.errors import ConfigError

MIN_STEPS = 3
MAX_STEPS = 10
REFERENCE_BATCH = 64
REFERENCE_LR = 1e-3
REFERENCE_HEAD_LR = 5e-2
MAX_LR_SCALE = 4.0
CLIP = 0.1
HEAD_START_SHARE = 0.25
# Mean cosine margin of a row's own class mean over the others' for MiniLM sentence embeddings
# (an assumption about the base's features, not a measurement of the institution's data).
ASSUMED_GAP = 0.05
MIN_SIGNAL_TO_NOISE = 2.0
# One head-start row adds a unit vector to its class's sum and 1 to its count: L2 sensitivity sqrt(2).
HEAD_START_SENSITIVITY = math.sqrt(2.0)

SET = "set in the config"


@dataclass(frozen=True)
class Institution:
    """What an institution knows before training, without spending privacy."""

    rows: int
    labels: int  # 0: no classification head (causal LM)
    private: bool
    epsilon: float
    delta: float
    accountant: str
    rounds: int
    examples_per_round: int
    persons: int | None = None
    """data.privacy_unit: the persons DP-SGD samples; None: rows are the unit."""
    rows_per_person: float = 1.0
    """Mean rows one sampled person contributes to a step (data.max_rows_per_unit caps each)."""

    @property
    def units(self) -> int:
        return self.persons if self.persons is not None else self.rows

    @property
    def unit_name(self) -> str:
        return "persons" if self.persons is not None else "rows"


@dataclass(frozen=True)
class Choice:
    value: Any
    reason: str


@dataclass(frozen=True)
class Recipe:
    batch_size: Choice
    sample_rate: Choice
    local_steps: Choice
    noise_multiplier: Choice
    max_grad_norm: Choice
    learning_rate: Choice
    head_learning_rate: Choice
    head_start: Choice
    head_start_noise: Choice

    def items(self) -> list[tuple[str, Choice]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]

    def head_start_history(self) -> tuple[tuple[float, float, int], ...]:
        """The head start as Opacus history (one step at sample rate 1), composed before the rounds."""
        if self.head_start.value != "dp":
            return ()
        return ((self.head_start_noise.value, 1.0, 1),)


def poisson_rate(rows: int, batch_size: int) -> float:
    """The rate Opacus samples at: one over the number of batches an epoch has."""
    return 1.0 / math.ceil(rows / batch_size)


def _kept(value: Any, manual: bool) -> Choice:
    return Choice(value, "recipe manual: the config's value or its manual default" if manual else SET)


def head_start_noise(inst: Institution) -> float:
    """Noise multiplier of the head start: the Gaussian mechanism spending HEAD_START_SHARE alone."""
    return calibrate_noise(HEAD_START_SHARE * inst.epsilon, inst.delta, inst.accountant, 1.0, 1)


def _head_start(inst: Institution, asked: str, manual: bool) -> tuple[Choice, Choice]:
    none = Choice(None, "no DP head start")
    if inst.labels == 0:
        return Choice("shared", "no classification head"), none
    if inst.persons is not None:
        return Choice(
            "shared", "privacy unit person: the class-mean release is per row, not per person"
        ), none
    if not inst.private:
        return Choice("shared", "privacy off: no budget to release class means from"), none
    if asked == "shared" or (asked == "auto" and manual):
        who = SET if asked == "shared" else "recipe manual"
        return Choice("shared", f"{who}: the head every party built (model.head_init)"), none
    try:
        sigma = head_start_noise(inst)
    except ConfigError as err:
        if asked == "dp":
            raise ConfigError(
                f"training.head_start: 'dp' on {HEAD_START_SHARE:.0%} of the budget: {err}"
            ) from None
        return Choice("shared", f"{HEAD_START_SHARE:.0%} of epsilon buys no release at all"), none
    noise = sigma * HEAD_START_SENSITIVITY
    per_class = inst.rows / inst.labels
    signal = ASSUMED_GAP * per_class
    chosen = Choice(
        sigma,
        f"{HEAD_START_SHARE:.0%} of epsilon alone: one Gaussian release of class sums and counts "
        f"(sensitivity sqrt(2), noise std {noise:.2f}), one DP-SGD step at sample rate 1 in the ledger",
    )
    if asked == "dp":
        return Choice("dp", SET), chosen
    if signal >= MIN_SIGNAL_TO_NOISE * noise:
        reason = (
            f"{per_class:.0f} rows per class x assumed margin {ASSUMED_GAP} = {signal:.1f} >= "
            f"{MIN_SIGNAL_TO_NOISE:g} x noise {noise:.2f}: noisy class means beat label names "
            "(Tramer & Boneh 2021; linear probe then fine-tune, Kumar et al. 2022)"
        )
        return Choice("dp", reason), chosen
    reason = (
        f"{per_class:.0f} rows per class x assumed margin {ASSUMED_GAP} = {signal:.1f} < "
        f"{MIN_SIGNAL_TO_NOISE:g} x noise {noise:.2f}: class means would be mostly noise; the label "
        "names are free (model.head_init)"
    )
    return Choice("shared", reason), none


def plan(inst: Institution, cfg: FedloraConfig, ledger_noise: float | None = None) -> Recipe:
    """The recipe for ``inst``; a value ``cfg`` sets (every one under recipe manual) is kept, and so is
    the noise a ledger fixed at its first round (``ledger_noise``)."""
    training, privacy = cfg.training, cfg.privacy
    manual = training.recipe == "manual"
    budget = inst.examples_per_round
    units, noun = inst.units, inst.unit_name
    # Compute is counted in rows: a sampled person brings rows_per_person of them.
    per = f" / {inst.rows_per_person:.1f} rows per person" if inst.persons is not None else ""
    if training.batch_size is not None:
        batch = _kept(training.batch_size, manual)
    else:
        size = max(1, min(units, int(budget / inst.rows_per_person) // MIN_STEPS))
        batch = Choice(
            size,
            f"min({noun} {units}, examples_per_round {budget}{per} / {MIN_STEPS} steps): the largest batch "
            "the compute allows (Li et al. 2022; Ponomareva et al. 2023)",
        )
    if training.local_steps is not None:
        steps = _kept(training.local_steps, manual)
    else:
        count = max(1, min(MAX_STEPS, int(budget / (batch.value * inst.rows_per_person))))
        steps = Choice(
            count,
            f"examples_per_round {budget}{per} / batch {batch.value}, at most {MAX_STEPS}: few, large steps "
            "(Li et al. 2022)",
        )
    rate = poisson_rate(units, batch.value)
    expected = rate * units
    rate_choice = Choice(
        rate, f"Poisson sampling over {noun}, 1 / ceil({noun} / batch): expected batch {expected:.0f} {noun}"
    )
    head, head_noise = _head_start(inst, training.head_start, manual)
    if inst.private and ledger_noise is not None:
        noise = Choice(ledger_noise, "fixed by the privacy ledger's first round, kept for its whole life")
    elif inst.private and steps.value > 0:
        history = ((head_noise.value, 1.0, 1),) if head.value == "dp" else ()
        planned = inst.rounds * steps.value
        sigma = calibrate_noise(inst.epsilon, inst.delta, inst.accountant, rate, planned, history)
        after = " after the head start" if history else ""
        noise = Choice(
            sigma,
            f"{inst.accountant} calibration: {inst.rounds} rounds x {steps.value} steps{after} spend "
            f"epsilon {inst.epsilon:g} at delta {inst.delta:g}",
        )
    else:
        noise = Choice(None, "no DP-SGD steps" if inst.private else "privacy off")
    if privacy.max_grad_norm is not None:
        clip = _kept(privacy.max_grad_norm, manual)
    else:
        clip = Choice(
            CLIP, "small, so every example is clipped and Adam's step ignores its scale (Li et al. 2022)"
        )
    scale = min(MAX_LR_SCALE, expected / REFERENCE_BATCH)
    why = (
        f"x {scale:.2f} = expected batch {expected:.0f} / {REFERENCE_BATCH} (at most {MAX_LR_SCALE:g}): "
        "the rate grows with the batch (Li et al. 2022), anchored at the drug-review preset"
    )
    if training.learning_rate is not None:
        lr = _kept(training.learning_rate, manual)
    else:
        lr = Choice(REFERENCE_LR * scale, f"{REFERENCE_LR:g} {why}")
    if training.head_learning_rate is not None:
        head_lr = _kept(training.head_learning_rate, manual)
    elif manual:
        head_lr = Choice(lr.value, "recipe manual: the LoRA learning rate")
    else:
        head_lr = Choice(REFERENCE_HEAD_LR * scale, f"{REFERENCE_HEAD_LR:g} {why}")
    return Recipe(batch, rate_choice, steps, noise, clip, lr, head_lr, head, head_noise)


def facts(
    cfg: FedloraConfig, rows: int, labels: int, persons: int | None = None, rows_per_person: float = 1.0
) -> Institution:
    """What the planner may know; ``persons`` and ``rows_per_person`` with data.privacy_unit."""
    return Institution(
        rows=rows,
        labels=labels if cfg.model.task == "classification" else 0,
        private=cfg.privacy.enabled,
        epsilon=cfg.privacy.epsilon,
        delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
        rounds=cfg.planned_rounds,
        examples_per_round=cfg.training.examples_per_round,
        persons=persons,
        rows_per_person=rows_per_person,
    )


def applied(cfg: FedloraConfig, recipe: Recipe) -> FedloraConfig:
    """``cfg`` with the recipe's values in place of the unset ones: what the trainer runs."""
    training = dataclasses.replace(
        cfg.training,
        batch_size=recipe.batch_size.value,
        local_steps=recipe.local_steps.value,
        learning_rate=recipe.learning_rate.value,
        head_learning_rate=recipe.head_learning_rate.value,
        head_start=recipe.head_start.value,
    )
    privacy = dataclasses.replace(cfg.privacy, max_grad_norm=recipe.max_grad_norm.value)
    return dataclasses.replace(cfg, training=training, privacy=privacy)
