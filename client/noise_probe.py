"""The noise a DP-SGD step actually added, measured beside Opacus without trusting its bookkeeping.

Before each step the per-example gradients (Opacus' ``grad_sample``, after client.privacy_unit's
grouping) are clipped to C and summed here, independently of the optimizer's own clipped sum
(``summed_grad``, which a broken implementation could corrupt along with the noise), and known
clipped contributions (the audit's gradient canaries) are added. After the step, the released
gradient times the expected batch size (Opacus' mean divides by it) minus that sum is the noise the
step added; its sum of squares feeds common.noise_check's chi-square test against sigma x C.
"""

from __future__ import annotations

import torch
from torch import nn

from fedlora.client.ledger import PrivacyLedger
from fedlora.common.noise_check import NoiseSums

Grads = dict[str, torch.Tensor]


class AddedNoise:
    """Called by the audit's gradient hook (client.canaries.GradientCanaries) at every DP step."""

    def __init__(self, clip: float, expected_batch: int) -> None:
        if expected_batch < 1:
            raise ValueError(f"the expected batch size must be at least 1, got {expected_batch}")
        self.clip = clip
        self.expected_batch = expected_batch
        self._rows: Grads = {}
        self._known: Grads = {}
        self.squares = 0.0
        self.samples = 0

    def add_examples(self, params: dict[str, nn.Parameter]) -> None:
        """Clip each example's gradient (over all trained parameters) to C and add it to the step's
        sum: called on every slice of a batch, before anything else joins its per-example gradients."""
        samples = {k: p.grad_sample for k, p in params.items()}
        count = len(next(iter(samples.values())))
        if count == 0:
            return
        norms = torch.stack([g.reshape(count, -1).double().norm(dim=1) for g in samples.values()], 1)
        factor = (self.clip / norms.norm(dim=1)).clamp(max=1.0)
        for key, g in samples.items():
            clipped = torch.einsum("i,i...->...", factor, g.double())
            self._rows[key] = self._rows[key] + clipped if key in self._rows else clipped

    def add_clipped(self, key: str, contribution: torch.Tensor) -> None:
        """A contribution to the step's clipped sum known by construction (a canary of length C)."""
        part = contribution.detach().double()
        self._known[key] = self._known[key] + part if key in self._known else part

    def after_step(self, params: dict[str, nn.Parameter]) -> Grads:
        """Measure the step's added noise; return the step's clipped sum of the examples alone."""
        rows = {
            k: self._rows.get(k, torch.zeros(p.shape, dtype=torch.float64, device=p.device))
            for k, p in params.items()
        }
        for key, p in params.items():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            noise = grad.detach().double() * self.expected_batch - rows[key] - self._known.get(key, 0.0)
            self.squares += float(noise.square().sum())
            self.samples += p.numel()
        self._rows, self._known = {}, {}
        return rows

    def take(self) -> tuple[float, int]:
        """The sum of squared added noise and the number of noised coordinates since the last take."""
        taken = self.squares, self.samples
        self.squares, self.samples = 0.0, 0
        return taken


def round_noise(added: AddedNoise, ledger: PrivacyLedger, round_id: int) -> NoiseSums:
    """The noise measured since the last take, against sigma x C with the sigma the ledger records
    for ``round_id`` (never the optimizer's own, which is what is being checked)."""
    squares, samples = added.take()
    if samples == 0:
        return NoiseSums()  # no DP step ran (and so the ledger may record nothing for the round)
    entries = [e for e in ledger.entries if e.round == round_id]
    if not entries:
        raise ValueError(f"the ledger records no round {round_id}, yet {samples} noised values were measured")
    return NoiseSums.of(squares, samples, entries[-1].noise_multiplier * added.clip)
