"""`lifecycle pipeline`: run the configured stages in order, each as its own `lifecycle <stage>` run."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lifecycle import STAGES, artifacts
from lifecycle.config import resolved, validate
from lifecycle.errors import ConfigError, LifecycleError

# Group choices of the pipeline that every stage inherits.
SHARED_GROUPS = ("experiment", "logger")


def run(cfg: DictConfig) -> dict:
    validate(cfg, "pipeline")
    started, config = time.time(), resolved(cfg)
    run_dir = artifacts.start_run(cfg.paths.run_dir, config)
    shared = _shared_overrides(cfg)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    done: dict[str, Path] = {}
    report = {}
    for stage, extra in cfg.stages.items():
        if stage not in STAGES or stage == "pipeline":
            raise ConfigError(f"stages.{stage}: not a stage; choose from {', '.join(s for s in STAGES if s != 'pipeline')}")
        stage_dir = (Path(cfg.paths.output_root) / stage / f"{stamp}-pipeline").resolve()
        wiring = [f"{key}={_output(done, source)}" for key, source in cfg.wiring.get(stage, {}).items()]
        cmd = [sys.executable, "-m", f"lifecycle.{stage}", f"hydra.run.dir={stage_dir}", *shared, *wiring, *extra]
        print(f"\n=== pipeline: {stage} ===\n$ lifecycle {stage} {' '.join(cmd[3:])}", flush=True)
        t0 = time.time()
        if subprocess.run(cmd).returncode != 0:
            raise LifecycleError(f"pipeline stopped: stage `{stage}` failed (its output above; its run dir: "
                                 f"{stage_dir}). Stages before it finished and kept their outputs")
        manifest = json.loads((stage_dir / "manifest.json").read_text())
        done[stage] = stage_dir
        report[stage] = {"run_dir": str(stage_dir), "seconds": round(time.time() - t0, 1),
                         "metrics": manifest["metrics"]}
    metrics = {f"pipeline/{s}_seconds": r["seconds"] for s, r in report.items()}
    metrics["pipeline/seconds"] = round(time.time() - started, 1)
    inputs = {s: {"path": r["run_dir"]} for s, r in report.items()}
    artifacts.finish_run(run_dir, "pipeline", inputs, {**metrics, "stages": report}, config, started)
    print(f"\npipeline finished in {metrics['pipeline/seconds']} s: " +
          ", ".join(f"{s} {r['seconds']} s" for s, r in report.items()) + f" -> {run_dir}")
    return metrics


def _output(done: dict[str, Path], source: str) -> Path:
    """`pretrain/model` -> <that pipeline run's pretrain dir>/model."""
    stage, _, sub = source.partition("/")
    if stage not in done:
        raise ConfigError(f"wiring: `{source}` names stage `{stage}`, which has not run earlier in this pipeline")
    return done[stage] / sub if sub else done[stage]


def _shared_overrides(cfg: DictConfig) -> list[str]:
    choices = HydraConfig.get().runtime.choices
    out = [f"paths.output_root={Path(cfg.paths.output_root).resolve()}"]
    out += [f"{g}={choices[g]}" for g in SHARED_GROUPS if choices.get(g) not in (None, "null")]
    return out
