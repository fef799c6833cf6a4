"""Run directories, atomic writes, manifests, content hashes and the `latest` link."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from lifecycle.errors import LifecycleError

log = logging.getLogger(__name__)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def dir_hash(path: Path) -> str:
    """One hash over every file below `path` (names and contents), in a stable order."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(path).rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        h.update(file_hash(p).encode())
    return "sha256:" + h.hexdigest()


def input_record(path: Path) -> dict:
    path = Path(path)
    resolved = path.resolve()
    digest = dir_hash(resolved) if resolved.is_dir() else file_hash(resolved)
    return {"path": str(resolved), "hash": digest}


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def start_run(run_dir: str | Path, config: dict) -> Path:
    """Create the run directory and write the resolved (secret-free) config into it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    return run_dir


def finish_run(run_dir: Path, stage: str, inputs: dict, metrics: dict, config: dict,
               started: float, wandb_run_id: str | None = None, promote: bool = True) -> None:
    """Write manifest.json, then (if `promote`: a successful run, an accepted candidate) point
    <output_root>/<stage>/latest at this run, if the run lies under <output_root>/<stage>/. A run kept elsewhere
    (hydra.run.dir=/tmp/try) leaves `latest` alone: the later stages' defaults read it, and an experiment run
    outside the outputs must not silently become their input."""
    manifest = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": round(time.time() - started, 2),
        "inputs": inputs,
        "git_sha": git_sha(),
        "wandb_run_id": wandb_run_id,
        "metrics": metrics,
        "config": config,
    }
    write_json(run_dir / "manifest.json", manifest)
    if not promote:
        return
    stage_root = Path(config["paths"]["output_root"]) / stage
    if stage_root.resolve() in Path(run_dir).resolve().parents:
        update_latest(run_dir, stage_root)
    else:
        log.warning("%s: the run %s is outside %s/, so %s/latest, which later stages read by default, stays where it "
                    "was (to publish such a run, give it paths.output_root=<its root>)", stage, run_dir, stage_root,
                    stage_root)


def update_latest(run_dir: Path, stage_root: Path) -> None:
    """Atomically repoint <stage_root>/latest at run_dir (a relative symlink; multirun jobs included)."""
    stage_root.mkdir(parents=True, exist_ok=True)
    link, tmp = stage_root / "latest", stage_root / f".latest.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(Path(run_dir).resolve(), stage_root.resolve()), tmp)
    os.replace(tmp, link)


def read_manifest(run_dir: str | Path, expect_stage: str) -> dict:
    """The manifest of a finished run, or a clear error saying which stage to run first."""
    run_dir = Path(run_dir)
    path = run_dir / "manifest.json"
    if not path.is_file():
        raise LifecycleError(f"{run_dir}: no finished `{expect_stage}` run there (no manifest.json); "
                             f"run `lifecycle {expect_stage}` first or point to a finished run directory")
    manifest = json.loads(path.read_text())
    if manifest.get("stage") != expect_stage:
        raise LifecycleError(f"{run_dir}: is a `{manifest.get('stage')}` run, expected `{expect_stage}`")
    return manifest


def config_digest(config: dict) -> str:
    """A short stable hash of plain config data (keys sorted), for cache keys."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
