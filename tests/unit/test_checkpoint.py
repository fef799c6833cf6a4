"""Checkpoints: atomic writes, safe loading, and clear errors for every kind of corruption."""
from __future__ import annotations

import errno
import pickle

import pytest
import torch

from lifecycle.errors import CheckpointError
from lifecycle.training import checkpoint
from lifecycle.training.checkpoint import AtomicCheckpointIO


def good(path, dim=4):
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(dim, dim)}, "global_step": 3}, path)


def test_roundtrip(tmp_path):
    good(tmp_path / "a.ckpt")
    assert checkpoint.load(tmp_path / "a.ckpt")["global_step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]


def test_truncated(tmp_path):
    good(tmp_path / "a.ckpt")
    data = (tmp_path / "a.ckpt").read_bytes()
    (tmp_path / "a.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"a\.ckpt: not a readable checkpoint.*truncated"):
        checkpoint.load(tmp_path / "a.ckpt")


def test_flipped_bytes(tmp_path):
    good(tmp_path / "a.ckpt")
    data = bytearray((tmp_path / "a.ckpt").read_bytes())
    for i in range(0, len(data), 97):
        data[i] ^= 0xFF
    (tmp_path / "a.ckpt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"a\.ckpt"):
        checkpoint.load(tmp_path / "a.ckpt")


def test_empty_and_text(tmp_path):
    (tmp_path / "e.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        checkpoint.load(tmp_path / "e.ckpt")
    (tmp_path / "t.ckpt").write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"t\.ckpt"):
        checkpoint.load(tmp_path / "t.ckpt")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if unpickled


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "x": Payload(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refused"):
        checkpoint.load(tmp_path / "evil.ckpt")
    with open(tmp_path / "evil2.ckpt", "wb") as f:
        pickle.dump(Payload(str(marker)), f)
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path / "evil2.ckpt")
    assert not marker.exists()


def test_other_model_dims_refused(tmp_path):
    good(tmp_path / "a.ckpt", dim=4)
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.ones(8, 8))
    with pytest.raises(CheckpointError, match=r"w has shape \(4, 4\) but the configured model has \(8, 8\)"):
        checkpoint.check_compatible(tmp_path / "a.ckpt", module)


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    good(tmp_path / "last.ckpt")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*disk is full"):
        good(tmp_path / "last.ckpt", dim=2)
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "last.ckpt")["state_dict"]["w"].shape == (4, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_stale_temp_files_are_cleaned(tmp_path, caplog):
    good(tmp_path / "last.ckpt")
    (tmp_path / ".last.ckpt.tmp-123").write_bytes(b"partial")
    checkpoint.clean_stale_temps(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert "stale partial checkpoint" in caplog.text


def test_find_resume(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        checkpoint.find_resume("last", tmp_path)
    for run in ("r1", "r2"):
        good(tmp_path / run / "checkpoints" / "last.ckpt")
    assert checkpoint.find_resume("last", tmp_path) == tmp_path / "r2" / "checkpoints" / "last.ckpt"
    assert checkpoint.find_resume(str(tmp_path / "r1"), tmp_path) == tmp_path / "r1" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.find_resume(str(tmp_path / "nope.ckpt"), tmp_path)
