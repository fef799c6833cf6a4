"""A W&B sweep file run by W&B: `wandb.sweep` registers it, `wandb agent` runs its command for each trial."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from lifecycle import artifacts
from lifecycle.errors import LifecycleError

ARGS = "${args_no_hyphens}"


def definition(spec, overrides: list[str]) -> dict:
    """The file's definition with our extra overrides on every trial's command line, before the swept ones."""
    command = list(spec.wandb["command"])
    at = command.index(ARGS) if ARGS in command else len(command)
    return {**spec.wandb, "command": command[:at] + list(overrides) + command[at:], "name": spec.name}


def agent_command(sweep_id: str, n_trials: int, project: str, entity: str | None) -> list[str]:
    exe = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    return [exe, "agent", "--count", str(n_trials), "--project", project,
            *(["--entity", entity] if entity else []), sweep_id]


def run(spec, overrides: list[str], cfg, sweep_dir: Path) -> dict:
    """Register the sweep, run `n_trials` of it here as an agent, and return the best run's metric."""
    import wandb

    project = OmegaConf.select(cfg, "logger.project") or "lifecycle"
    entity = OmegaConf.select(cfg, "logger.entity")
    sweep_id = wandb.sweep(sweep=definition(spec, overrides), project=project, entity=entity)
    done = subprocess.run(agent_command(sweep_id, spec.n_trials, project, entity))
    if done.returncode != 0:
        raise LifecycleError(f"wandb agent {sweep_id} exited {done.returncode}")
    api = wandb.Api()
    sweep = api.sweep(f"{entity or api.default_entity}/{project}/{sweep_id}")
    best = sweep.best_run()
    summary = {"name": spec.name, "stage": spec.stage, "metric": spec.metric, "sweep_id": sweep_id,
               "url": sweep.url, "best": {"run": best.id, "url": best.url, "value": best.summary.get(spec.metric)}
               if best else None, "trials": len(sweep.runs)}
    artifacts.write_json(sweep_dir / "summary.json", summary)
    print(f"W&B sweep {sweep.url}: best run {best.url if best else 'none'}")
    return {spec.metric: summary["best"]["value"] if best else None, "sweep/id": sweep_id}
