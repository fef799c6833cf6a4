"""`lifecycle pipeline`: run the configured steps in order, each as its own `lifecycle <stage>` run."""
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

# Group choices of the pipeline that every step inherits.
SHARED_GROUPS = ("experiment", "logger")
GATE_FAILED = 3  # the evaluate stage's exit status for a rejected candidate


def run(cfg: DictConfig) -> dict:
    validate(cfg, "pipeline")
    started, config = time.time(), resolved(cfg)
    run_dir = artifacts.start_run(cfg.paths.run_dir, config)
    shared, stamp = _shared_overrides(cfg), time.strftime("%Y-%m-%d_%H-%M-%S")
    done: dict[str, Path] = {}
    report = {}
    for name, step in cfg.steps.items():
        if step.stage not in STAGES or step.stage == "pipeline":
            raise ConfigError(f"steps.{name}.stage={step.stage}: not a stage; choose from "
                              f"{', '.join(s for s in STAGES if s != 'pipeline')}")
        step_dir = (Path(cfg.paths.output_root) / step.stage / f"{stamp}-{name}").resolve()
        wiring = [f"{key}={_output(done, source)}" for key, source in cfg.wiring.get(name, {}).items()]
        cmd = [sys.executable, "-m", f"lifecycle.{step.stage}", f"hydra.run.dir={step_dir}", *shared, *wiring,
               *step.overrides]
        print(f"\n=== pipeline: {name} ===\n$ lifecycle {step.stage} {' '.join(cmd[3:])}", flush=True)
        t0 = time.time()
        code = subprocess.run(cmd).returncode
        if code not in (0, GATE_FAILED):
            raise LifecycleError(f"pipeline stopped: step `{name}` (lifecycle {step.stage}) failed (its output above; "
                                 f"its run dir: {step_dir}). Steps before it finished and kept their outputs")
        manifest = json.loads((step_dir / "manifest.json").read_text())
        done[name] = step_dir
        report[name] = {"stage": step.stage, "run_dir": str(step_dir), "seconds": round(time.time() - t0, 1),
                        "metrics": manifest["metrics"]}
    metrics = {f"pipeline/{s}_seconds": r["seconds"] for s, r in report.items()}
    metrics["pipeline/seconds"] = round(time.time() - started, 1)
    gates = {s: r["metrics"]["gate"]["verdict"] for s, r in report.items() if r["metrics"].get("gate")}
    inputs = {s: {"path": r["run_dir"]} for s, r in report.items()}
    artifacts.finish_run(run_dir, "pipeline", inputs, {**metrics, "gates": gates, "steps": report}, config, started)
    print(f"\npipeline finished in {metrics['pipeline/seconds']} s: " +
          ", ".join(f"{s} {r['seconds']} s" for s, r in report.items()) + f" -> {run_dir}")
    for step, verdict in gates.items():
        print(f"gate at {step}: {verdict}" + ("" if verdict == "pass" else " (the candidate is not promoted)"))
    return metrics


def _output(done: dict[str, Path], source: str) -> Path:
    """`pretrain/model` -> <this pipeline's pretrain step run dir>/model."""
    step, _, sub = source.partition("/")
    if step not in done:
        raise ConfigError(f"wiring: `{source}` names step `{step}`, which has not run earlier in this pipeline")
    return done[step] / sub if sub else done[step]


def _shared_overrides(cfg: DictConfig) -> list[str]:
    choices = HydraConfig.get().runtime.choices
    out = [f"paths.output_root={Path(cfg.paths.output_root).resolve()}"]
    out += [f"{g}={choices[g]}" for g in SHARED_GROUPS if choices.get(g) not in (None, "null")]
    return out
