"""Atomic, resumable checkpoints."""

from __future__ import annotations

import pytest
import torch

from fedlora.common.errors import CheckpointError
from fedlora.server.checkpoint import POINTER, Checkpoint, load_checkpoint, save_checkpoint


def ckpt(round_: int) -> Checkpoint:
    return Checkpoint(
        round=round_,
        fingerprint="fp",
        adapter={"a": torch.full((2, 3), float(round_))},
        strategy={"m_t/a": torch.ones(2, 3)},
        history=[{"round": r} for r in range(round_ + 1)],
    )


def test_round_trip_and_only_latest_kept(tmp_path) -> None:
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, ckpt(1))
    save_checkpoint(tmp_path, ckpt(2))
    got = load_checkpoint(tmp_path)
    assert got.round == 2 and torch.equal(got.adapter["a"], torch.full((2, 3), 2.0))
    assert got.history[-1] == {"round": 2} and torch.equal(got.strategy["m_t/a"], torch.ones(2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [POINTER, "round-00002"]


def test_half_written_round_is_ignored(tmp_path) -> None:
    save_checkpoint(tmp_path, ckpt(1))
    (tmp_path / "round-00002").mkdir()  # a crash before the pointer moved
    (tmp_path / "round-00002" / "adapter.safetensors").write_bytes(b"partial")
    assert load_checkpoint(tmp_path).round == 1


@pytest.mark.parametrize("victim", ["adapter.safetensors", "strategy.safetensors", "state.json"])
def test_damaged_checkpoint_is_a_one_line_error(tmp_path, victim) -> None:
    target = save_checkpoint(tmp_path, ckpt(1))
    (target / victim).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert str(target) in str(err.value) and "\n" not in str(err.value)


def test_non_finite_adapter_is_refused(tmp_path) -> None:
    bad = ckpt(1)
    bad.adapter["a"][0, 0] = float("nan")
    save_checkpoint(tmp_path, bad)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_checkpoint(tmp_path)


def test_every_file_of_a_round_is_on_disk_before_the_pointer_names_it(tmp_path, monkeypatch) -> None:
    """fsync'd in order: the round's tensors and state, then the pointer (an OS crash in between
    leaves the previous round readable)."""
    import os

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    save_checkpoint(tmp_path, ckpt(1))
    files = [name for name in synced if name.startswith(".")]  # the temp files, before their rename
    assert [name.split(".")[1] for name in files] == ["adapter", "strategy", "state", POINTER]
    assert load_checkpoint(tmp_path).round == 1
