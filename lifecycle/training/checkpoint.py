"""Checkpoints that are written atomically and loaded without running pickled code."""
from __future__ import annotations

import errno
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lifecycle.errors import CheckpointError

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temp file, fsync, rename: a crash never leaves a half-written checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            hint = " (the disk is full: free space or move paths.output_root)" if e.errno == errno.ENOSPC else ""
            raise CheckpointError(f"cannot write checkpoint into {path.parent}: {e.strerror}{hint}; "
                                  "the previous checkpoint there is intact") from None

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load(Path(path), map_location)


def load(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a Lightning checkpoint with `weights_only=True`; every failure names the file and the reason."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted copy?); use an earlier checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: refused to load: it holds objects other than tensors and plain data "
                              f"({first}). lifecycle never unpickles code from a checkpoint; use a checkpoint "
                              "written by lifecycle") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: not a readable checkpoint ({first}); it is truncated or corrupt. "
                              "Use an earlier checkpoint in the same directory") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return ckpt


def check_compatible(path: Path, module: torch.nn.Module) -> dict[str, Any]:
    """Load `path` and refuse it if its tensors do not fit `module` (other model dims)."""
    ckpt = load(path)
    own = module.state_dict()
    for name, tensor in ckpt["state_dict"].items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)} but the configured model has "
                                  f"{tuple(own[name].shape)}; resume with the model config the checkpoint was "
                                  "trained with (see config.yaml beside its checkpoints/)")
    missing = sorted(set(own) - set(ckpt["state_dict"]))
    if missing:
        raise CheckpointError(f"{path}: lacks {len(missing)} model tensors (first: {missing[0]}); it was written "
                              "for another model")
    return ckpt


def clean_stale_temps(ckpt_dir: Path) -> None:
    """Remove temp files left by a process killed mid-write, with a warning."""
    for tmp in Path(ckpt_dir).glob(".*.tmp-*"):
        log.warning("removing stale partial checkpoint %s (a previous run was killed while writing it)", tmp)
        tmp.unlink(missing_ok=True)


def find_resume(ckpt_path: str, stage_dir: Path) -> Path:
    """`last` -> newest last.ckpt of any run of this stage; a run dir -> its last.ckpt; else the file itself."""
    if ckpt_path == "last":
        found = sorted(stage_dir.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise CheckpointError(f"ckpt_path=last: no checkpoints/last.ckpt under {stage_dir}; "
                                  "nothing to resume (drop ckpt_path to start fresh)")
        return found[-1]
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt" if (path / "checkpoints").is_dir() else path / "last.ckpt"
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path}: {path} does not exist; give `last`, a run directory "
                              "or a .ckpt file")
    return path
