"""Server optimisers: the step from the adapter a round started at to the next global adapter, given
what the aggregator made of the replies (``federation.strategy``).

Each is the few lines of its paper's update over the aggregated delta, written here because Flower's
versions are welded to its strategy classes. The arithmetic is Flower's (numpy, same order and dtypes),
so results match its FedAvgM / FedAdam / FedYogi; the state (moments, momentum) is plain tensors by
adapter key, kept in the checkpoint, so a resumed round is the same bits as an uninterrupted one.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from numpy.typing import NDArray

from fedlora.common import protocol as P
from fedlora.common.errors import CheckpointError

Arrays = dict[str, NDArray]


class ServerOptimiser:
    """The interface, and FedAvg's step: the aggregate is the next global adapter. An optimiser that
    learns across rounds keeps it in `moments` (name -> adapter key -> array), named in `moment_names`."""

    name: ClassVar[str]
    moment_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.moments: dict[str, Arrays] = {}

    def train_config(self) -> dict[str, float]:
        """What clients need to know of the optimiser, added to every train message."""
        return {}

    def step(self, current: Mapping[str, NDArray], aggregated: Arrays, server_round: int) -> Arrays:
        """The next global adapter from the one the round started at and the aggregate of its replies;
        ``server_round`` is the federation's absolute round."""
        return aggregated

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}/{key}": torch.from_numpy(np.asarray(value).copy())
            for name, arrays in self.moments.items()
            for key, value in arrays.items()
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """CheckpointError for state this optimiser does not keep (another strategy's, or an older
        fedlora's layout): resuming with it would silently restart the optimiser."""
        moments: dict[str, Arrays] = {}
        for full, value in state.items():
            name, _, key = full.partition("/")
            if name not in self.moment_names:
                raise CheckpointError(
                    f"strategy state {name!r} is not kept by federation.strategy {self.name} "
                    f"(it keeps: {', '.join(self.moment_names) or 'nothing'}); it comes from another "
                    "strategy or an older fedlora: move the run folder aside to start afresh"
                )
            moments.setdefault(name, {})[key] = value.numpy()
        self.moments = moments


class FedAvg(ServerOptimiser):
    name = "fedavg"


class FedProx(ServerOptimiser):
    """FedAvg's step; clients pull toward the round's start with weight ``proximal_mu``
    (client.trainer)."""

    name = "fedprox"

    def __init__(self, proximal_mu: float) -> None:
        super().__init__()
        self.proximal_mu = proximal_mu

    def train_config(self) -> dict[str, float]:
        return {P.PROXIMAL_MU: self.proximal_mu}


class FedAvgM(ServerOptimiser):
    """Server SGD with momentum on the pseudo-gradient ``current - aggregated`` (Hsu et al. 2019; the
    convention of torch.optim.SGD, no Nesterov)."""

    name = "fedavgm"
    moment_names = ("momentum",)

    def __init__(self, server_learning_rate: float, server_momentum: float) -> None:
        super().__init__()
        self.lr, self.momentum = server_learning_rate, server_momentum

    def step(self, current: Mapping[str, NDArray], aggregated: Arrays, server_round: int) -> Arrays:
        if self.momentum == 0.0 and self.lr == 1.0:
            return aggregated
        gradient = {k: current[k] - new for k, new in aggregated.items()}
        if self.momentum > 0.0:
            before = self.moments.get("momentum")
            if before is not None:
                gradient = {k: self.momentum * before[k] + g for k, g in gradient.items()}
            self.moments["momentum"] = gradient
        return {k: np.asarray(current[k] - self.lr * g) for k, g in gradient.items()}


class _AdaptiveOptimiser(ServerOptimiser, ABC):
    """FedAdam and FedYogi (Reddi et al. 2021): first moment ``m_t`` of the delta, second ``v_t``."""

    moment_names = ("m_t", "v_t")
    beta_1, beta_2, tau = 0.9, 0.99, 1e-3  # Flower's defaults for both

    def __init__(self, server_learning_rate: float) -> None:
        super().__init__()
        self.eta = server_learning_rate

    def step(self, current: Mapping[str, NDArray], aggregated: Arrays, server_round: int) -> Arrays:
        delta = {k: x - current[k] for k, x in aggregated.items()}
        m_t = self.moments.get("m_t") or {k: np.zeros_like(v) for k, v in aggregated.items()}
        m_t = {k: self.beta_1 * v + (1 - self.beta_1) * delta[k] for k, v in m_t.items()}
        v_t = self.moments.get("v_t") or {k: np.zeros_like(v) for k, v in aggregated.items()}
        v_t = {k: self._second_moment(v, delta[k] ** 2) for k, v in v_t.items()}
        self.moments = {"m_t": m_t, "v_t": v_t}
        eta = self._step_size(server_round)
        return {k: np.asarray(x + eta * m_t[k] / (np.sqrt(v_t[k]) + self.tau)) for k, x in current.items()}

    @abstractmethod
    def _second_moment(self, v: NDArray, squared: NDArray) -> NDArray:
        """``v_t`` from its last value and the squared delta."""

    def _step_size(self, server_round: int) -> float:
        return self.eta


class FedAdam(_AdaptiveOptimiser):
    name = "fedadam"

    def _second_moment(self, v: NDArray, squared: NDArray) -> NDArray:
        return self.beta_2 * v + (1 - self.beta_2) * squared

    def _step_size(self, server_round: int) -> float:
        """Adam's bias correction, counted in the federation's rounds (so it survives a resume)."""
        return (
            self.eta
            * np.sqrt(1 - np.power(self.beta_2, server_round + 1.0))
            / (1 - np.power(self.beta_1, server_round + 1.0))
        )


class FedYogi(_AdaptiveOptimiser):
    name = "fedyogi"

    def _second_moment(self, v: NDArray, squared: NDArray) -> NDArray:
        return v - (1.0 - self.beta_2) * squared * np.sign(v - squared)


OPTIMISERS: dict[str, type[ServerOptimiser]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedProx)
}


def create_optimiser(name: str, **options: Any) -> ServerOptimiser:
    """The optimiser ``name`` from the options it takes (others are ignored: one config feeds all)."""
    cls = OPTIMISERS.get(name)
    if cls is None:
        raise ValueError(f"unknown server optimiser {name!r} (known: {', '.join(OPTIMISERS)})")
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted})
