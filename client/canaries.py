"""The privacy audit's canaries, inserted inside the institution's own trainer (never sent as data).

Two kinds, as in Steinke, Nasr and Jagielski (2023), each canary included independently with
probability 1/2:

- white-box (gradient) canaries: a fixed random direction in the space of the trained (sent)
  parameters. An included canary is Poisson-sampled at the rows' rate (the persons' with
  data.privacy_unit: a canary is a person) at every step and, when drawn,
  joins the batch as one more per-example gradient of norm CANARY_NORM_FACTOR x the clipping norm;
  Opacus clips it to the clipping norm like any row (a broken clip lets it through whole), sums and
  noises it. Under DP its score is its share of the summed privatized gradients minus the rows' own
  clipped gradients (recomputed at each step by client.noise_probe: an adversary who knows every
  row, the one DP protects against, can compute them), so the rows do not blur the canaries at
  all; without DP, how far the adapter's change went against its direction. This audits the
  implementation: sampling, clipping, noise and accounting. The same per-step recomputation gives
  the audit's direct noise check (common.noise_check).
- black-box (input) canaries: rows of random tokens with a random label (causal LM: a random
  response), added to the training rows when included (they count as rows: the sample rate is over
  the enlarged set). Score: how much the adapter's training lowered the canary's loss; what an
  attacker who sees only the model learns.

Everything derives from one secret seed kept in the institution's own file (``CanarySpec``), so a
trainer made per message inserts the same canaries in every round.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedlora.client.noise_probe import AddedNoise
from fedlora.client.trainer import trained_parameters
from fedlora.common.adapter import State, peft_module
from fedlora.common.config import FedloraConfig
from fedlora.common.data import IGNORE_INDEX, TokenizedDataset
from fedlora.common.durable import write_durably
from fedlora.common.errors import ConfigError
from fedlora.common.scoring import forward_loss

WHITE_BOX_CANARIES = 1000
BLACK_BOX_CANARIES = 100
CANARY_TOKENS = 16
CANARY_NORM_FACTOR = 2.0
"""White-box canaries are this many clipping norms long, so that clipping must act on them."""
FIRST_TOKEN = 1000
"""Random canary tokens are drawn above the ids tokenizers keep for special tokens."""
_WHITE, _BLACK = 1, 2  # sub-streams of the seed
RELEASED, SENT, ROWS, NOISE = "released", "sent", "rows", "noise"  # the running sums' names
NOISE_FIELDS = ("statistic", "samples", "squares", "calibrated")  # NOISE's entries: a NoiseSums


@dataclass(frozen=True)
class CanarySpec:
    """What an audit inserts: all of it follows from ``seed``, which never leaves the institution."""

    seed: int
    white_box: int
    black_box: int
    space: tuple[tuple[str, tuple[int, ...]], ...]
    task: str
    vocab_size: int
    num_labels: int

    def included(self, kind: int) -> np.ndarray:
        count = self.white_box if kind == _WHITE else self.black_box
        return np.random.default_rng([self.seed, kind]).random(count) < 0.5

    @property
    def white_box_included(self) -> np.ndarray:
        return self.included(_WHITE)

    @property
    def black_box_included(self) -> np.ndarray:
        return self.included(_BLACK)

    @property
    def dimension(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.space)

    def save(self, path: Path) -> None:
        write_durably(path, json.dumps(asdict(self), indent=1).encode())

    @classmethod
    def load(cls, path: Path) -> CanarySpec:
        try:
            raw = json.loads(path.read_text())
            raw["space"] = tuple((key, tuple(shape)) for key, shape in raw["space"])
            return cls(**raw)
        except (OSError, ValueError, KeyError, TypeError) as err:
            problem = f"{type(err).__name__}: {err}"
            raise ConfigError(f"{path}: audit canary file is unreadable ({problem})") from None


def new_spec(
    cfg: FedloraConfig, model: nn.Module, vocab_size: int, num_labels: int, white_box: int, black_box: int
) -> CanarySpec:
    """Fresh canaries for ``model``'s trained parameters, from a secret seed."""
    if white_box < 2 or black_box < 0 or black_box == 1:
        raise ConfigError(
            f"canaries: {white_box} white-box and {black_box} black-box; expected at least 2 white-box "
            "and 0 or at least 2 black-box"
        )
    if cfg.privacy.enabled and cfg.privacy.grad_sample_mode != "hooks":
        raise ConfigError(
            f"privacy.grad_sample_mode: {cfg.privacy.grad_sample_mode!r}; the white-box audit inserts "
            "per-example gradients, which needs 'hooks'"
        )
    space = tuple((key, tuple(p.shape)) for key, p in sorted(trained_parameters(model).items()))
    spec = CanarySpec(
        seed=secrets.randbits(62),
        white_box=white_box,
        black_box=black_box,
        space=space,
        task=cfg.model.task,
        vocab_size=vocab_size,
        num_labels=num_labels,
    )
    if spec.dimension < 2 * white_box:
        raise ConfigError(
            f"canaries: {white_box} white-box canaries in a space of {spec.dimension} trained parameters; "
            f"use at most {spec.dimension // 2} (or a larger model.lora_r): their scores are decorrelated "
            "by least squares, which needs far fewer canaries than dimensions"
        )
    return spec


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def direction(spec: CanarySpec, index: int) -> torch.Tensor:
    """White-box canary ``index``: a unit vector over the flattened trained parameters."""
    v = torch.randn(spec.dimension, generator=_generator(spec.seed, _WHITE, index), dtype=torch.float64)
    return (v / v.norm()).float()


def flatten(spec: CanarySpec, state: State) -> torch.Tensor:
    """A state over the canary space as one vector, in the space's order."""
    missing = [key for key, _ in spec.space if key not in state]
    if missing:
        raise ConfigError(f"audit: the adapter has no tensor {missing[0]!r} of the canaries' space")
    return torch.cat([state[key].detach().float().reshape(-1).cpu() for key, _ in spec.space])


class GradientCanaries:
    """The trainer's gradient hook: the included white-box canaries Poisson-sampled into each step
    (before it), and the sum over steps of the gradient each step used, clipped and noised (after it):
    what DP-SGD releases at every step, and so what its epsilon covers. Scoring that sum rather than
    the adapter's final change keeps the optimiser (Adam rescales every coordinate) and the rows'
    own descent out of the audit of sampling, clipping, noise and accounting. Under DP it also sums
    the rows' own clipped gradients over steps (``rows``, in the released scale) and measures the
    noise each step added (``noise``, client.noise_probe); ``expected_batch`` is the trainer's."""

    def __init__(self, spec: CanarySpec, cfg: FedloraConfig, sample_rate: float, expected_batch: int) -> None:
        self.spec = spec
        self.sample_rate = sample_rate
        self.private = cfg.privacy.enabled
        self.clip = cfg.privacy.max_grad_norm
        self.length = CANARY_NORM_FACTOR * cfg.privacy.max_grad_norm
        self.noise = AddedNoise(self.clip, expected_batch) if self.private else None
        self.rows = torch.zeros(spec.dimension, dtype=torch.float64)
        # Without DP there is no clip: a canary weighs what a row at the clipping norm would in the mean.
        self.weight = cfg.privacy.max_grad_norm / cfg.training.batch_size
        self.members = np.flatnonzero(spec.white_box_included)
        self._directions: torch.Tensor | None = None
        self.released = torch.zeros(spec.dimension, dtype=torch.float64)

    def directions(self) -> torch.Tensor:
        """The included canaries' directions, one row each (made once per trainer)."""
        if self._directions is None:
            rows = [direction(self.spec, int(i)) for i in self.members]
            self._directions = torch.stack(rows) if rows else torch.zeros((0, self.spec.dimension))
        return self._directions

    def before_partial_sum(self, params: dict[str, nn.Parameter]) -> None:
        if self.noise is not None:
            self.noise.add_examples(params)

    def before_step(self, params: dict[str, nn.Parameter]) -> None:
        self.before_partial_sum(params)  # the rows' last slice, before canaries join it
        drawn = torch.rand(len(self.members)) < self.sample_rate
        if not drawn.any():
            return
        rows = self.directions()[drawn]
        offset = 0
        for key, shape in self.spec.space:
            size = int(np.prod(shape))
            param = params[key]
            part = rows[:, offset : offset + size].reshape(len(rows), *shape).to(param.device, param.dtype)
            offset += size
            if self.private:
                param.grad_sample = torch.cat([param.grad_sample, self.length * part])
                self.noise.add_clipped(key, self.clip * part.sum(0))  # each clipped to exactly C
            else:
                param.grad = param.grad + self.weight * part.sum(0)

    def after_step(self, params: dict[str, nn.Parameter]) -> None:
        grads = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in params.items()}
        self.released += flatten(self.spec, grads).double()
        if self.noise is not None:
            rows = self.noise.after_step(params)
            self.rows += flatten(self.spec, rows).double() / self.noise.expected_batch


def white_box_evidence(
    private: bool, released: torch.Tensor, rows: torch.Tensor, sent: torch.Tensor
) -> torch.Tensor:
    """What white-box canaries are scored on: under DP the summed privatized gradients (``released``)
    less the rows' own clipped share of them (``rows``), leaving the canaries and the noise: the score
    of an adversary who knows every other row, as DP allows; without DP, where nothing is clipped or
    noised and the rows' unclipped gradients would drown a canary in that sum, the summed change the
    institution sent (``sent``, flattened), against its direction (training descends gradients). The
    choice follows the config alone, so each audit is one test, not the best of two."""
    return released.double() - rows.double() if private else -sent.double()


def white_box_scores(spec: CanarySpec, evidence: torch.Tensor) -> np.ndarray:
    """Each canary's share of the evidence, the directions decorrelated: least squares of it on all
    of them, so that the other canaries' overlap with a direction (about sqrt(m / dimension)) does
    not blur its score. Any function of what was released is a valid score; this one separates best
    when the space is small."""
    flat = evidence.double()
    directions = torch.stack([direction(spec, i) for i in range(spec.white_box)])
    gram = (directions @ directions.T).double()
    return torch.linalg.solve(gram, directions.double() @ flat).numpy()


def input_canaries(spec: CanarySpec) -> TokenizedDataset:
    """All black-box canaries (included or not): random tokens, random label or response."""
    g = _generator(spec.seed, _BLACK)
    low = FIRST_TOKEN if spec.vocab_size > 2 * FIRST_TOKEN else 1
    ids = torch.randint(low, spec.vocab_size, (spec.black_box, CANARY_TOKENS), generator=g)
    mask = torch.ones_like(ids)
    if spec.task == "classification":
        labels = torch.randint(0, spec.num_labels, (spec.black_box,), generator=g)
    else:
        labels = ids.clone()
        labels[:, : CANARY_TOKENS // 2] = IGNORE_INDEX  # the first half is the prompt
    return TokenizedDataset(ids, mask, labels)


def _pad_to(data: TokenizedDataset, width: int) -> TokenizedDataset:
    extra = width - data.input_ids.shape[1]
    if extra <= 0:
        return data
    pad = torch.nn.functional.pad
    labels = pad(data.labels, (0, extra), value=IGNORE_INDEX) if data.labels.dim() == 2 else data.labels
    return TokenizedDataset(
        pad(data.input_ids, (0, extra)), pad(data.attention_mask, (0, extra)), labels, data.units
    )


def with_input_canaries(train: TokenizedDataset, spec: CanarySpec) -> TokenizedDataset:
    """The training rows plus the included black-box canaries; with data.privacy_unit each canary is
    a person of its own (one row)."""
    if spec.black_box == 0:
        return train
    canaries = input_canaries(spec).subset(np.flatnonzero(spec.black_box_included))
    width = max(train.input_ids.shape[1], canaries.input_ids.shape[1])
    a, b = _pad_to(train, width), _pad_to(canaries, width)
    units = None
    if train.units is not None:
        first = int(train.units.max()) + 1 if len(train.units) else 0
        units = torch.cat([train.units, torch.arange(first, first + len(canaries))])
    return TokenizedDataset(
        torch.cat([a.input_ids, b.input_ids]),
        torch.cat([a.attention_mask, b.attention_mask]),
        torch.cat([a.labels, b.labels]),
        units,
    )


@torch.no_grad()
def canary_losses(model: nn.Module, task: str, data: TokenizedDataset, device: torch.device) -> np.ndarray:
    """Each canary's own loss under ``model`` (one at a time: the causal-LM loss is a batch mean)."""
    module = peft_module(model)
    was_training = module.training
    module.eval()
    losses = []
    for i in range(len(data)):
        batch = tuple(t[i : i + 1].to(device) for t in (data.input_ids, data.attention_mask, data.labels))
        losses.append(float(forward_loss(module, task, batch)[0]))
    module.train(was_training)
    return np.array(losses)
