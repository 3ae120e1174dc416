"""The recipe planner: DP fine-tuning settings from what an institution knows before training.

Pure: it reads counts the institution already holds (rows, labels), its budget and plan, and its
compute budget; it never looks at a row, so planning spends no privacy and nothing leaves. Every
value comes with a one-line reason naming its rule and source:

- batch and steps: Ponomareva et al. 2023, "How to DP-fy ML" (fix the steps, then the largest batch
  the compute allows) and Li et al. 2022, "Large Language Models Can Be Strong Differentially Private
  Learners" (large batches, few steps): batch = min(rows, examples_per_round / MIN_STEPS), steps =
  examples_per_round / batch, at most MAX_STEPS.
- noise: calibrated by the institution's accountant so that the head start and every planned step
  together spend exactly the budget (common.accounting.calibrate_noise).
- clipping: Li et al. 2022: a small norm clips every example; Adam's update is then independent of
  the norm's scale, so CLIP only has to be below the per-example gradient norms.
- learning rates: Li et al. 2022: the rate grows with the batch; linear in the expected batch,
  anchored at the hand-tuned drug-review preset (REFERENCE_*), at most MAX_LR_SCALE times it.
- statistics first (client.statistics): every classifier releases its class statistics once, in
  round 0, at STATISTICS_SHARE of the budget (the measurement of issue 27: the summed release at
  epsilon 2 of 8 reached 0.683 where ten rounds of DP-LoRA stayed at the majority class); the rest
  pays the LoRA rounds. Per person (data.privacy_unit) too: each person's rows are averaged, so one
  person has the sensitivity one row has, and the same release is charged per person.
- fine-tune or not: the server averages the K institutions a round samples (training.peers_per_round),
  so over the run's R rounds x T steps of expected batch B, with d trainable values and noise sigma,
  the averaged update's signal-to-noise is at best sqrt(R T) x B sqrt(K) / (sigma sqrt(d)) (every
  clipped per-example gradient pointing the same way). The run of issue 27, whose rounds were noise
  (all 24 LoRA tensors at one norm, majority class throughout), had about 5.4 on this scale; below
  MIN_RUN_SNR (twice that) DP-SGD is planned to add nothing measurable: no LoRA steps (the institution
  answers LoRA rounds with an empty update that the server does not average in) and the whole budget
  on the statistics. A config that sets local_steps keeps its rounds.
- head rounds (client.head_rounds): where LoRA would add nothing, the head alone may still learn from
  the rows: every round each institution sends one clipped gradient sum of the head over all its
  rows (sample rate 1) and the server takes an SGD step on the average (common.head_gradient). One
  noise for the statistics release and the R rounds, calibrated so that R + 1 steps at sample rate 1
  spend the budget. Its best-case signal-to-noise is the same expression over the head's values D:
  sqrt(R) x rows sqrt(K) / (sigma sqrt(D)) where each of the K adds its full noise; under secure
  aggregation (federation.secure_aggregation, m guaranteed noise shares) the sum carries sqrt(K / m)
  sigma C, so sqrt(R) x rows K sqrt(m / K) / (sigma sqrt(D)): sqrt(m) times as much (head_noise_of_sum).
  Head rounds are planned at MIN_HEAD_SNR or above, else
  the statistics keep the whole budget. Measured against statistics only (``python -m benchmarks
  head_rounds``, frozen MiniLM, 10 institutions, Dirichlet 0.5, 3 paired seeds, 10 and 30 rounds,
  the learning rate chosen on training rows): MedMCQA subjects, whose median institution's head
  signal-to-noise is 12.2-12.6 at epsilon 2 and 41-42 at 8, gained macro-F1 everywhere (+7.5 to +8.2
  points at epsilon 2, +1.6 to +4.0 at 8) and accuracy at epsilon 2 (+1.4 and +2.5, intervals above
  0), none lost; drug-review rating at 6.5-6.7 (epsilon 8) moved accuracy by +0.6 and +1.1 points
  (intervals across 0) and at 1.9-2.0 (epsilon 2) lost up to 5.6; triage at 0.6-2.0 lost 2 to 6
  points. That was against the statistics head before its shrinkage correction
  (server.statistics_head.cosine_shrinkage). Against the corrected head, on the same seeds,
  statistics only scores MedMCQA 0.497 / 0.353 at epsilon 2 and 0.536 / 0.444 at 8 (accuracy /
  macro-F1), and 10 head rounds move accuracy by +0.6 [-0.2, +1.4] and -1.4 [-3.6, +0.8] points
  (30 rounds: +1.1 [+0.1, +2.1] and -0.8 [-3.2, +1.6]), macro-F1 by +2.4 and -6.4 (the release's
  share of the budget shrinks, so round 0 starts 3-7 points lower). No measured signal-to-noise up to
  42 paid at the default 10 rounds. Under distributed noise (``python -m benchmarks head_rounds
  --noise local distributed central``, 5 paired seeds, 10 rounds) the sum's signal-to-noise reaches
  MedMCQA's 40.6 at epsilon 2 and 135.6 at 8, and head rounds still lost to statistics only under the
  same noise: -1.5 [-2.6, -0.4] and -0.7 [-1.1, -0.3] accuracy points, -5.8 and -2.6 macro-F1; even
  with centralised noise they lost (-1.8, -0.4). So MIN_HEAD_SNR = 300 plans head rounds only above
  every signal-to-noise measured (institutions with several times MedMCQA's rows): a bound from where
  they did not pay, not a fit of where they do.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from fedlora.common.accounting import calibrate_noise
from fedlora.common.config import FedloraConfig
from fedlora.common.errors import ConfigError
from fedlora.common.head_gradient import CLIP as HEAD_CLIP
from fedlora.common.head_gradient import LEARNING_RATE as HEAD_STEP

MIN_STEPS = 3
MAX_STEPS = 10
REFERENCE_BATCH = 64
REFERENCE_LR = 1e-3
REFERENCE_HEAD_LR = 5e-2
MAX_LR_SCALE = 4.0
CLIP = 0.1
STATISTICS_SHARE = 0.25
MIN_RUN_SNR = 10.0
MIN_HEAD_SNR = 300.0

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
    peers: int = 1
    """Institutions whose updates the server averages each round (K)."""
    trainable: int = 1
    """Values DP-SGD trains (LoRA factors and head): each one receives the noise."""
    round_zero: bool = True
    """A federation's round 0 asks for the class statistics; False: no release will happen (train-local,
    federation.statistics_first false), so the rounds get the whole budget."""
    head_values: int = 0
    """Values of the classification head (classes x (width + 1)) a head round's gradient has; 0: unknown."""
    shares: int | None = None
    """federation.secure_aggregation: m, the institutions whose noise shares every secure sum holds (peers
    less tolerated dropouts and colluders); None: each of the K averaged institutions adds full noise."""

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
    statistics_noise: Choice
    fine_tune: Choice
    head_rounds: Choice

    def items(self) -> list[tuple[str, Choice]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]

    def statistics_history(self) -> tuple[tuple[float, float, int], ...]:
        """The statistics release as Opacus history (one step at sample rate 1), before the rounds."""
        return stats_history(self.statistics_noise)

    def calibration(self, rounds: int) -> tuple[float, int, tuple[tuple[float, float, int], ...]]:
        """What the ledger calibrates its noise for (sample rate, steps, what composes first): the
        rounds after the statistics; with no LoRA steps, the statistics alone, one step at rate 1
        that then spends the whole budget; with head rounds, the release and the rounds, all at sample
        rate 1 and one noise."""
        if self.head_rounds.value:
            return 1.0, rounds + 1, ()
        if not self.fine_tune.value:
            return 1.0, 1, ()
        return self.sample_rate.value, rounds * self.local_steps.value, self.statistics_history()


def poisson_rate(rows: int, batch_size: int) -> float:
    """The rate Opacus samples at: one over the number of batches an epoch has."""
    return 1.0 / math.ceil(rows / batch_size)


def _kept(value: Any, manual: bool) -> Choice:
    return Choice(value, "recipe manual: the config's value or its manual default" if manual else SET)


def statistics_noise(inst: Institution, share: float) -> float:
    """Noise multiplier of the statistics release: the Gaussian mechanism spending ``share`` alone."""
    return calibrate_noise(share * inst.epsilon, inst.delta, inst.accountant, 1.0, 1)


def _no_statistics(inst: Institution) -> str | None:
    """Why this institution releases no statistics, or None."""
    if inst.labels == 0:
        return "no classification head"
    if not inst.round_zero:
        return "no round 0 (train-local, or federation.statistics_first false): nothing to release"
    if not inst.private:
        return "privacy off: the exact statistics leave (a non-private baseline)"
    return None


def _released_per(inst: Institution) -> str:
    """What the release's unit is, for its reason: per person, each person's rows averaged."""
    if inst.persons is None:
        return ""
    return f" of {inst.persons} persons, each person's rows averaged (a person counts once)"


def run_snr(inst: Institution, expected: float, steps: int, sigma: float) -> float:
    """The best-case signal-to-noise of the run's averaged updates (see the module's docstring)."""
    signal = math.sqrt(inst.rounds * steps) * expected * math.sqrt(inst.peers)
    return signal / (sigma * math.sqrt(inst.trainable))


def head_snr(inst: Institution, sigma: float) -> float:
    """The best-case signal-to-noise of the run's averaged head gradients: one step of every row a
    round, over the head's values (see the module's docstring). The K replies summed carry noise
    sqrt(K) sigma C when each adds it in full; under secure aggregation each adds a share sigma C /
    sqrt(m) and the sum carries sqrt(K / m) sigma C: sigma C once where all m = K guaranteed shares
    are the sum's, sqrt(m) times the plain signal-to-noise."""
    signal = math.sqrt(inst.rounds) * inst.units * inst.peers
    return signal / (head_noise_of_sum(inst, sigma) * math.sqrt(inst.head_values))


def head_noise_of_sum(inst: Institution, sigma: float) -> float:
    """The noise multiplier of the K head gradients' sum: sqrt(K) sigma (each adds its full noise), or
    sqrt(K / m) sigma under secure aggregation (each adds its share of sigma, common.distributed_noise)."""
    return sigma * math.sqrt(inst.peers / inst.shares if inst.shares else inst.peers)


def _head_noise_assumed(inst: Institution, sigma: float) -> str:
    """What the head's signal-to-noise assumed of the noise of the sum, in words."""
    if inst.shares:
        return (
            f"secure aggregation: {inst.peers} peers' shares summed, {inst.shares} guaranteed, noise "
            f"{sigma:.2f} x sqrt({inst.peers} / {inst.shares})"
        )
    return f"each of {inst.peers} peers adds its full noise: {sigma:.2f} x sqrt({inst.peers})"


def head_noise(inst: Institution) -> float:
    """The one noise multiplier of the statistics release and every head round together."""
    return calibrate_noise(inst.epsilon, inst.delta, inst.accountant, 1.0, inst.rounds + 1)


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
    no_release = _no_statistics(inst)
    stats = Choice(None, no_release or "")
    fine = Choice(True, "privacy off: no noise to weigh" if not inst.private else SET)
    head = Choice(False, "LoRA rounds train the head with the adapter")
    if inst.private and steps.value > 0:
        planned = inst.rounds * steps.value
        if no_release is None:
            try:
                stats = Choice(
                    statistics_noise(inst, STATISTICS_SHARE),
                    f"{STATISTICS_SHARE:.0%} of epsilon alone: one Gaussian release of class sums and "
                    f"counts{_released_per(inst)} (sensitivity sqrt(2)), one DP-SGD step at sample rate 1 "
                    "in the ledger, round 0",
                )
            except ConfigError:
                no_release = f"{STATISTICS_SHARE:.0%} of epsilon buys no release at all"
                stats = Choice(None, no_release)
        sigma = calibrate_noise(
            inst.epsilon, inst.delta, inst.accountant, rate, planned, stats_history(stats)
        )
        after = " after the statistics" if stats.value is not None else ""
        noise = Choice(
            sigma,
            f"{inst.accountant} calibration: {inst.rounds} rounds x {steps.value} steps{after} spend "
            f"epsilon {inst.epsilon:g} at delta {inst.delta:g}",
        )
        snr = run_snr(inst, expected, steps.value, sigma)
        why = (
            f"best-case signal-to-noise of the averaged updates sqrt({inst.rounds} rounds x {steps.value} "
            f"steps) x batch {expected:.0f} x sqrt({inst.peers} peers) / (noise {sigma:.2f} x "
            f"sqrt({inst.trainable} trained values)) = {snr:.1f}"
        )
        if training.local_steps is not None:
            fine = Choice(True, f"{SET} (training.local_steps); {why}")
        elif snr >= MIN_RUN_SNR or no_release is not None:
            fine = Choice(True, f"{why} >= {MIN_RUN_SNR:g}" if snr >= MIN_RUN_SNR else f"{why}; {no_release}")
        else:
            fine = Choice(
                False, f"{why} < {MIN_RUN_SNR:g}: DP-SGD of LoRA would add nothing measurable on these {noun}"
            )
            head = _head_choice(inst)
            if head.value:
                sigma = head_noise(inst)
                stats = Choice(
                    sigma,
                    f"one noise for the release and the {inst.rounds} head rounds: {inst.rounds + 1} steps "
                    f"at sample rate 1 spend epsilon {inst.epsilon:g} ({inst.accountant})",
                )
                batch = Choice(units, f"head rounds: every one of the {units} {noun}")
                rate_choice = Choice(1.0, "head rounds: every row each round")
                steps = Choice(0, "no LoRA steps: head rounds, one noisy step of the head a round instead")
                noise = Choice(sigma, stats.reason)
            else:
                whole = statistics_noise(inst, 1.0)
                stats = Choice(
                    whole,
                    f"the whole epsilon: one Gaussian release of class sums and counts{_released_per(inst)}, "
                    "round 0",
                )
                steps = Choice(0, "no LoRA steps: " + fine.reason.split(": ", 1)[0])
                noise = Choice(None, "no DP-SGD steps: the statistics spend the budget")
                fine = Choice(
                    False,
                    f"{fine.reason}; {head.reason}: the whole budget goes to the round-0 statistics and "
                    "rounds are answered without training",
                )
    else:
        noise = Choice(None, "no DP-SGD steps" if inst.private else "privacy off")
    if ledger_noise is not None and noise.value is not None:
        noise = Choice(ledger_noise, "fixed by the privacy ledger's first round, kept for its whole life")
    if privacy.max_grad_norm is not None:
        clip = _kept(privacy.max_grad_norm, manual)
    elif head.value:
        clip = Choice(
            HEAD_CLIP, "head rounds: a unit feature's head gradient is at most sqrt(2); 1 clips the worst"
        )
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
    return Recipe(batch, rate_choice, steps, noise, clip, lr, head_lr, stats, fine, head)


def _head_choice(inst: Institution) -> Choice:
    """Head rounds or not, where LoRA was found to add nothing; the release must happen (checked by
    the caller): it builds the head the rounds start from and counts the rows they divide by."""
    if inst.head_values == 0:
        return Choice(False, "no head rounds: the head's size is unknown to the planner")
    if inst.persons is not None:
        return Choice(False, "no head rounds: they clip each row's gradient, not each person's")
    sigma = head_noise(inst)
    snr = head_snr(inst, sigma)
    why = (
        f"head rounds' signal-to-noise sqrt({inst.rounds} rounds) x {inst.units} {inst.unit_name} x "
        f"{inst.peers} peers / (noise of the sum, {_head_noise_assumed(inst, sigma)}, x "
        f"sqrt({inst.head_values} head values)) = {snr:.1f}"
    )
    if snr >= MIN_HEAD_SNR:
        return Choice(
            True,
            f"{why} >= {MIN_HEAD_SNR:g}: every round, one clipped, noisy gradient sum of the head over all "
            f"rows; the server steps the head at lr {HEAD_STEP:g} (LoRA is not trained)",
        )
    return Choice(False, f"{why} < {MIN_HEAD_SNR:g}")


def stats_history(stats: Choice) -> tuple[tuple[float, float, int], ...]:
    """A planned release (its noise multiplier, or None) as Opacus history."""
    return ((stats.value, 1.0, 1),) if stats.value is not None else ()


def facts(
    cfg: FedloraConfig,
    rows: int,
    labels: int,
    persons: int | None = None,
    rows_per_person: float = 1.0,
    trainable: int = 1,
    round_zero: bool = True,
    head_values: int = 0,
) -> Institution:
    """What the planner may know; ``persons`` and ``rows_per_person`` with data.privacy_unit;
    ``trainable``: the values DP-SGD trains (the model's trainable parameters); ``round_zero``: False
    where no federation's round 0 will ask for statistics (train-local); ``head_values``: the
    classification head's values (0: no head rounds are planned)."""
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
        peers=cfg.training.peers_per_round,
        trainable=trainable,
        round_zero=round_zero and cfg.federation.statistics_first,
        head_values=head_values,
        shares=secure_shares(cfg),
    )


def secure_shares(cfg: FedloraConfig) -> int | None:
    """m under federation.secure_aggregation (the planner's peers less the tolerated dropouts and
    colluders, at least 1); None without it."""
    fed = cfg.federation
    if not fed.secure_aggregation:
        return None
    return max(1, cfg.training.peers_per_round - fed.secagg_dropouts - fed.secagg_colluders)


def applied(cfg: FedloraConfig, recipe: Recipe) -> FedloraConfig:
    """``cfg`` with the recipe's values in place of the unset ones: what the trainer runs."""
    training = dataclasses.replace(
        cfg.training,
        batch_size=recipe.batch_size.value,
        local_steps=recipe.local_steps.value,
        learning_rate=recipe.learning_rate.value,
        head_learning_rate=recipe.head_learning_rate.value,
    )
    privacy = dataclasses.replace(cfg.privacy, max_grad_norm=recipe.max_grad_norm.value)
    return dataclasses.replace(cfg, training=training, privacy=privacy)
