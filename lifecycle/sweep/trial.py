"""One trial: the stage as its own process (`python -m lifecycle.<stage> <overrides>`), so every DDP rank Lightning
starts re-reads the same sampled overrides from the command line; intermediate values feed the pruner."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lifecycle.sweep.spec import Param, text

POLL_S = 1.0


@dataclass
class Outcome:
    state: str  # complete | pruned | failed
    metrics: dict = field(default_factory=dict)
    error: str | None = None


def distributions(params: dict[str, Param]) -> dict:
    """The optuna distribution of every searched key."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, p in params.items():
        if p.kind == "categorical":
            out[key] = CategoricalDistribution(p.choices)
        elif p.kind == "int":
            out[key] = IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[key] = FloatDistribution(float(p.low), float(p.high), log=p.log, step=p.step)
    return out


def overrides(params: dict[str, Param], values: dict) -> list[str]:
    """The sampled values as Hydra overrides (q_log_uniform_values rounded to its quantum)."""
    out = []
    for key, value in values.items():
        q = params[key].quantum
        out.append(f"{key}={text(round(value / q) * q if q else value)}")
    return out


def command(stage: str, run_dir: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", f"lifecycle.{stage}", f"hydra.run.dir={run_dir}", *args]


def launch(cmd: list[str], run_dir: Path, metric: str, trial=None) -> Outcome:
    """Run a trial to its end; report `metric` from metrics.jsonl as it appears and stop the run if pruned."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "trial.log"
    with open(log_path, "wb") as log:
        # A session of its own: pruning stops the DDP ranks the trial started too.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        seen = 0
        while proc.poll() is None:
            time.sleep(POLL_S)
            seen = _report(trial, run_dir / "metrics.jsonl", metric, seen)
            if trial is not None and seen and trial.should_prune():
                _stop(proc)
                return Outcome("pruned", error=f"pruned at step {seen}")
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        return Outcome("failed", error=f"exit {proc.returncode}: " + " | ".join(tail))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return Outcome("complete", manifest["metrics"])


def _report(trial, history: Path, metric: str, seen: int) -> int:
    """Report rows of `metric` newer than step `seen`; return the newest step reported."""
    if trial is None or not history.is_file():
        return seen
    for line in history.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if row.get(metric) is not None and row["step"] > seen:
            trial.report(float(row[metric]), row["step"])
            seen = row["step"]
    return seen


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
