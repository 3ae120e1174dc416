"""Adapter models lent for one message and reset to the fresh adapter when handed back.

A simulation's actor serves thousands of virtual institutions one message at a time; a fresh copy
of the adapter model per message (``build_model``) cost a deep copy of some 1,800 objects and the
garbage they leave: 5 of the 17 ms a message spent outside its DP steps (README, "A thousand
institutions"). ``borrowed_model`` lends an idle copy instead. Nothing of a client stays behind:
on the way back every tensor that is not the shared frozen base is overwritten with the fresh
adapter's values, gradients are dropped, attributes the message added are removed and flags set
back; a copy whose structure changed (a layer folded into a private base, a hook left on a module,
a parameter added or replaced, an error mid-message) is not kept at all.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from fedlora.common.config import ModelConfig
from fedlora.common.model import BuiltModel, fresh_adapter, frozen_base

MAX_IDLE = 2
"""Idle copies kept per fresh adapter model (a process serves one message at a time, or a few)."""

_PLAIN = (bool, int, float, str, type(None))


@dataclass
class _Part:
    """A module or tensor of the fresh model, as every copy must still be: its name and type, its
    attribute names and plain values (flags, counts), its hook counts; for a tensor, the tensor."""

    name: str
    kind: type
    keys: frozenset[str]
    plain: dict[str, object]
    hooks: dict[str, int]
    tensor: torch.Tensor | None = None
    shared: bool = False
    """A frozen base parameter every copy holds itself (the same object), never a copy."""


def _part(name: str, thing: object, tensor: bool = False, shared: Collection[int] = ()) -> _Part:
    attributes = vars(thing)
    return _Part(
        name=name,
        kind=type(thing),
        keys=frozenset(attributes),
        plain={k: v for k, v in attributes.items() if isinstance(v, _PLAIN)},
        hooks={k: len(v) for k, v in attributes.items() if "hooks" in k and isinstance(v, dict)},
        tensor=thing if tensor else None,
        shared=id(thing) in shared,
    )


@dataclass
class _Pool:
    modules: list[_Part]
    tensors: list[_Part]
    idle: list[nn.Module] = field(default_factory=list)


_pools: weakref.WeakKeyDictionary[nn.Module, _Pool] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _pool(fresh: nn.Module, template: nn.Module) -> _Pool:
    pool = _pools.get(fresh)
    if pool is None:
        shared = frozen_base(template).keys()
        pool = _pools[fresh] = _Pool(
            modules=[_part(name, module) for name, module in fresh.named_modules()],
            tensors=[_part(name, t, tensor=True, shared=shared) for name, t in _tensors(fresh)],
        )
    return pool


@contextmanager
def borrowed_model(cfg: ModelConfig, labels: Sequence[str], vocab_size: int) -> Iterator[BuiltModel]:
    """``build_model``'s model for the duration of one message; kept for the next one only if it
    could be reset to exactly the fresh adapter model."""
    fresh, template, fingerprint = fresh_adapter(cfg, tuple(labels), vocab_size)
    with _lock:
        pool = _pool(fresh, template)
        model = pool.idle.pop() if pool.idle else None
    if model is None:
        model = copy.deepcopy(fresh, memo=frozen_base(template))
    yield BuiltModel(model=model, fingerprint=fingerprint)
    if reset(model, pool):
        with _lock:
            if len(pool.idle) < MAX_IDLE:
                pool.idle.append(model)


def reset(model: nn.Module, pool: _Pool) -> bool:
    """Make ``model`` (a copy of the pool's fresh model) equal to it again; False where it cannot be."""
    modules, tensors = list(model.named_modules()), _tensors(model)
    if len(modules) != len(pool.modules) or len(tensors) != len(pool.tensors):
        return False
    for (name, module), part in zip(modules, pool.modules, strict=True):
        if not _fits(name, module, part):
            return False
    for (name, tensor), part in zip(tensors, pool.tensors, strict=True):
        original = part.tensor
        if not _fits(name, tensor, part) or tensor.shape != original.shape:
            return False
        if tensor.requires_grad != original.requires_grad or (part.shared and tensor is not original):
            return False  # (a fold gives a layer a private base)
    # Only now, with every check passed, is anything written.
    for (_, module), part in zip(modules, pool.modules, strict=True):
        _set_back(module, part)
    with torch.no_grad():
        for (_, tensor), part in zip(tensors, pool.tensors, strict=True):
            _set_back(tensor, part)
            tensor.grad = None
            if tensor is not part.tensor:
                tensor.copy_(part.tensor)
    return True


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def _fits(name: str, thing: object, part: _Part) -> bool:
    """The same name and type, every attribute of the fresh one still there, a plain one still plain,
    and as many hooks of each kind."""
    attributes = vars(thing)
    if name != part.name or type(thing) is not part.kind or not part.keys <= attributes.keys():
        return False
    if any(not isinstance(attributes[k], _PLAIN) for k in part.plain):
        return False
    return all(len(attributes[k]) == n for k, n in part.hooks.items())


def _set_back(thing: object, part: _Part) -> None:
    """The fresh plain values back (torch leaves ``_is_full_backward_hook`` set once Opacus' hooks are
    gone); attributes the fresh one lacks dropped: Opacus leaves each layer's ``activations`` and
    each parameter's ``summed_grad`` (the batch's clipped gradient sum, before noise)."""
    attributes = vars(thing)
    for key in attributes.keys() - part.keys:
        delattr(thing, key)
    for key, value in part.plain.items():
        if attributes[key] is not value and attributes[key] != value:
            setattr(thing, key, value)
