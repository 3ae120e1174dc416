"""After every round: the global adapter, the strategy's state, the round, the history and the
adapter of the round best on validation so far (one more adapter, not one per round).

A round is written into its own folder, then a small ``LATEST`` pointer is replaced durably: a crash
at any moment leaves the previous complete round readable, and a restarted server resumes from it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from fedlora.common.durable import write_durably
from fedlora.common.errors import CheckpointError

POINTER = "LATEST"
ADAPTER = "adapter.safetensors"
STRATEGY = "strategy.safetensors"
BEST = "best.safetensors"
STATE = "state.json"


@dataclass
class Checkpoint:
    round: int
    fingerprint: str
    adapter: dict[str, torch.Tensor]
    strategy: dict[str, torch.Tensor]
    history: list[dict]
    best: dict[str, torch.Tensor] | None = None
    """The adapter of the round best on validation so far (the history says which round), so that a
    resumed run exports the same round; None without validation."""


def save_checkpoint(folder: str | Path, ckpt: Checkpoint) -> Path:
    root = Path(folder)
    target = root / f"round-{ckpt.round:05d}"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    # Every file of the round on disk before the pointer names it (an OS crash, not only a process
    # crash, must leave the previous round readable).
    write_durably(target / ADAPTER, save({k: v.contiguous() for k, v in ckpt.adapter.items()}))
    write_durably(target / STRATEGY, save({k: v.contiguous() for k, v in ckpt.strategy.items()}))
    if ckpt.best is not None:
        write_durably(target / BEST, save({k: v.contiguous() for k, v in ckpt.best.items()}))
    state = {"round": ckpt.round, "fingerprint": ckpt.fingerprint, "history": ckpt.history}
    write_durably(target / STATE, json.dumps(state, indent=1, default=float).encode())
    write_durably(root / POINTER, target.name.encode())
    for old in root.glob("round-*"):
        if old.is_dir() and old.name != target.name:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(folder: str | Path) -> Checkpoint | None:
    """The last complete round, None when there is none yet; CheckpointError if it is damaged."""
    root = Path(folder)
    pointer = root / POINTER
    if not pointer.exists():
        return None
    target = root / pointer.read_text().strip()
    try:
        state = json.loads((target / STATE).read_text())
        adapter = load_file(target / ADAPTER)
        strategy = load_file(target / STRATEGY)
        best = load_file(target / BEST) if (target / BEST).exists() else None
        ckpt = Checkpoint(
            round=int(state["round"]),
            fingerprint=str(state["fingerprint"]),
            adapter=adapter,
            strategy=strategy,
            history=list(state["history"]),
            best=best,
        )
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise CheckpointError(
            f"{target}: checkpoint is damaged ({type(err).__name__}: {err}); "
            "move the run folder aside to start afresh"
        ) from None
    for name, tensors in ((ADAPTER, adapter), (BEST, best or {})):
        bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"{target / name}: non-finite values in {bad[0]!r}")
    return ckpt
