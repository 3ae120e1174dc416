"""Head rounds: what the institution and the coordinator agree on about one noisy step of the head.

In a head round (client.recipe plans it where LoRA would add nothing measurable but the head's
averaged gradient still would) every institution sends one vector: the sum over all its rows (sample
rate 1) of the clipped per-example gradients of the cross-entropy with respect to the classification
head, plus Gaussian noise. The vector is flat, the weight's rows then the bias (``flat``), so that
the same vector can later be quantised and summed under secure aggregation (issue 28). The server
divides the sum by the rows round 0 released and takes one SGD step at ``LEARNING_RATE``
(server.head_step).
"""

from __future__ import annotations

import torch
from torch import Tensor

LEARNING_RATE = 20.0
"""The server's SGD step on the averaged head gradient. Measured on frozen MiniLM features
(``python -m benchmarks head_rounds``, the rate chosen among 2, 5 and 20 on a validation split of
training rows): on MedMCQA subjects 20 was chosen for every seed at epsilon 2 and 8, 10 and 30
rounds; the sets where mostly 2 or 5 were chosen (drug-review triage and rating) are below the planner's
threshold for head rounds (client.recipe.MIN_HEAD_SNR), so they never run them."""
CLIP = 1.0
"""The per-example clipping norm of a head gradient: a unit feature's gradient has norm at most
sqrt(2) (|softmax - onehot| <= sqrt 2 times |(x, 1)| = sqrt 2), so 1 clips only the confidently wrong."""


def flat(weight: Tensor, bias: Tensor) -> Tensor:
    """The head's values as one vector: the weight's rows, then the bias."""
    return torch.cat([weight.reshape(-1), bias.reshape(-1)])


def unflat(vector: Tensor, classes: int, width: int) -> tuple[Tensor, Tensor]:
    """The weight (classes x width) and bias of a ``flat`` vector."""
    return vector[: classes * width].reshape(classes, width), vector[classes * width :]


def length(classes: int, width: int) -> int:
    """Values of a head-gradient vector."""
    return classes * (width + 1)
