"""The shared head from the federation's summed class statistics (round 0, before any LoRA round).

Every institution releases once, under its own Gaussian mechanism, per class the sum of its rows'
L2-normalised pooled embeddings and the row count (client.statistics); one with a person as its
privacy unit (data.privacy_unit) weights each row 1 / its person's rows, so its sums and counts are in
persons (fractional per class). Each class sum is then still its count times a mean of unit rows, which
is all the head reads: directions from the sums, the prior from the counts' shares (in a federation
mixing both, a share of rows and persons together). The server SUMS the releases
(not heads): the noise of K releases adds up as sqrt(K) while the signal adds up as K, and one prior
from the summed counts replaces K skewed ones. The head is nearest class mean: row c is head_scale x
a unit class direction (a cosine head, as the label-name start), its bias the log of class c's share
of the summed counts. Averaging per-institution heads instead shrinks the rows and lets the averaged
log-shares of skewed institutions outvote the cosine (issue 27: one class everywhere).

Each class direction is a posterior mean between the noisy summed direction and the public start
(the label names' embeddings u_c, model.head_init, no privacy cost), weighted by what the release
itself says, with no constant tuned on any test rows. With noise variance v per released value
(the sum of the institutions' variances), D values a row and P_c = |S_c|^2 - D v the class's signal
power (noise removed in expectation): the summed directions' error per dimension is v C / sum_c P_c,
the label names' error is estimated from the same release by the method of moments,
(sum_c |S_c - sqrt(P_c) u_c|^2 - C D v) / (D sum_c P_c), and the data's weight is the start's error
over the sum of both. One weight for every class (see data_weight). Where the sums are mostly noise
the label names decide; as rows accumulate or the noise falls (epsilon rises) the data take over;
without noise the head is the exact nearest class mean. Measured against the former fixed prior
weight (2 x the noise's norm, chosen on triage's test rows), LDA and the per-institution average on
frozen features: ``python -m benchmarks stats_head``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

# A class whose summed noisy count falls below one row (or person) keeps a share of one: the log prior
# stays finite and such a class is merely unlikely, never impossible.
MIN_COUNT = 1.0
# The expected cosine a class's noisy direction is corrected for is taken as at least this: at most a
# twofold boost (python -m benchmarks stats_head; distributed_noise: 0.5 against no floor and 0.7).
MIN_SHRINKAGE = 0.5


def summed(releases: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The federation's class sums and counts: the sum of every institution's (sums, counts)."""
    sums = torch.stack([s.to(torch.float64) for s, _ in releases]).sum(0)
    counts = torch.stack([c.to(torch.float64) for _, c in releases]).sum(0)
    return sums, counts


def summed_variance(noise_stds: Sequence[float]) -> float:
    """The per-value noise variance of the summed release (independent Gaussians add variances)."""
    return sum(s * s for s in noise_stds)


def data_weight(sums: Tensor, start: Tensor, noise_var: float) -> float:
    """The posterior weight (0 to 1) of the released directions against the start's, one for every
    class: a weight per class would mix, class by class, directions of different cosine with every
    row (the class means share the features' common part, the label names do not) and so favour the
    classes with more rows."""
    if noise_var == 0.0:
        return 1.0
    width = sums.shape[1]
    power = ((sums * sums).sum(1) - width * noise_var).clamp(min=0.0)
    total = float(power.sum())
    if total <= 0.0:
        return 0.0
    gap = ((sums - power.sqrt()[:, None] * start) ** 2).sum(1) - width * noise_var
    start_var = max(float(gap.sum()), 0.0) / total / width
    data_var = noise_var * sums.shape[0] / total
    return start_var / (start_var + data_var)


def cosine_shrinkage(sums: Tensor, noise_var: float) -> Tensor:
    """Per class, the expected cosine of its noisy summed direction with its true one,
    sqrt(P_c / (P_c + D v)), floored at MIN_SHRINKAGE. Noise in D dimensions lengthens a sum, so a
    unit row of a noisy direction scores every row lower by this factor, most for the classes with
    fewest rows: without the correction less noise could make the head worse (distributed noise on
    triage, 0.70 against 0.78 with ten times the noise), as the small classes stopped being
    predicted. The floor bounds how far noise is amplified where a class is nearly all noise."""
    sums = sums.to(torch.float64)
    power = ((sums * sums).sum(1) - sums.shape[1] * noise_var).clamp(min=0.0)
    spread = power + sums.shape[1] * noise_var
    ratio = torch.where(spread > 0, power / spread.clamp(min=1e-300), torch.ones_like(power))
    return ratio.sqrt().clamp(min=MIN_SHRINKAGE)


def class_mean_head(
    sums: Tensor, counts: Tensor, head_scale: float, start: Tensor | None = None, noise_var: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Nearest class mean with the federation's prior: weight rows head_scale x the unit class
    directions (with ``start``, the posterior mean of the released direction, whose summed noise has
    per-value variance ``noise_var``, divided by its expected shrinkage, and the start's direction),
    biases the log of the class shares of the (noisy) counts; fp32 as the head is kept."""
    direction = nn.functional.normalize(sums.to(torch.float64), dim=-1)
    if start is None:
        weight = head_scale * direction
    else:
        prior = nn.functional.normalize(start.to(torch.float64), dim=-1)
        data = data_weight(sums.to(torch.float64), prior, noise_var)
        corrected = direction / cosine_shrinkage(sums, noise_var)[:, None]
        weight = head_scale * (data * corrected + (1 - data) * prior)
    kept = counts.to(torch.float64).clamp(min=MIN_COUNT)
    bias = torch.log(kept / kept.sum())
    return weight.float(), bias.float()
