"""`lifecycle optimize`: apply a variant's passes (merge, int8/int4, prune, distill, compile) to a model and report
what the variant bought (size, speed) and cost (perplexity) against the model it started from."""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from omegaconf import DictConfig

from lifecycle import artifacts, tracking
from lifecycle.config import build, resolved, validate
from lifecycle.errors import DataError
from lifecycle.optimize import report, source
from lifecycle.optimize.measure import PeakMemory, count_params, quality, speed, weights_mb

STAGE = "optimize"


def run(cfg: DictConfig) -> dict:
    validate(cfg, STAGE)
    started, config, run_dir = time.time(), resolved(cfg), Path(cfg.paths.run_dir)
    # Everything that can be refused is refused here, from config files alone: before a model loads.
    passes = [build(node) for node in cfg.passes.values()]
    model_dir, base_dir = source.resolve(cfg.source.model, cfg.source.base)
    facts = source.facts(model_dir, base_dir)
    for p in passes:
        facts = p.check(facts)
    if not (Path(cfg.data.dir) / "val.bin").is_file():
        raise DataError(f"data.dir={cfg.data.dir}: not a finished `lifecycle data` run (no val.bin); set data.dir "
                        "to the data run the model was trained on")
    from lightning.pytorch import seed_everything

    from lifecycle.optimize import variant
    from lifecycle.optimize.tune import Tuner

    artifacts.start_run(run_dir, config)
    seed_everything(cfg.seed, verbose=False)
    name, sweep = _names(cfg)
    inputs = source.record(model_dir, base_dir)
    with PeakMemory() as peak:
        model, tokenizer = source.load(model_dir, base_dir)
        base = _cached_base(sweep, inputs) or _row(model, tokenizer, cfg, "base", "the source model",
                                                   [d for d in (model_dir, base_dir) if d])
    if "peak_mb" not in base:
        base["peak_mb"] = peak.mb
    for p in passes:
        model = p.apply(model, Tuner(cfg, run_dir))
    out = variant.save(model, tokenizer, run_dir / "model", name, passes, inputs)
    del model
    gc.collect()
    row = report.with_changes(_measure_saved(out, cfg, name, passes), base)

    artifacts.write_json(run_dir / report.ROW, row)
    if sweep is not None:
        artifacts.write_json(sweep / report.BASE, {**base, "inputs": inputs})
    rows = report.gather(sweep) if sweep is not None else [base, row]
    rows = [{k: v for k, v in r.items() if k != "inputs"} for r in rows]
    for directory in [run_dir] + ([sweep] if sweep is not None else []):
        report.write(rows, directory)
    metrics = {f"optimize/{k}": v for k, v in row.items() if isinstance(v, (int, float))}
    metrics |= {f"optimize/base/{k}": v for k, v in base.items() if isinstance(v, (int, float))}
    logger = tracking.make_logger(cfg.logger, run_dir, STAGE, cfg.name, config)
    if logger is not None:
        logger.log_metrics(metrics)
        report.log(logger, rows)
        tracking.link_lineage(logger, run_dir, {"model": model_dir, "model:base": base_dir},
                              {f"optimized-model:{name}": out}, cfg.name, metrics)
    artifacts.finish_run(run_dir, STAGE, inputs, {**metrics, "variant": name, "model": str(out),
                                                  "passes": [p.record() for p in passes]},
                         config, started, tracking.run_id(logger))
    tracking.finish(logger)
    report.print_table(rows, run_dir)
    return metrics


def _row(model, tokenizer, cfg: DictConfig, name: str, passes: str, weight_dirs: list[Path]) -> dict:
    """One report row: what the model is and what it measures."""
    return {"variant": name, "passes": passes, "params": count_params(model), "size_mb": weights_mb(*weight_dirs),
            **quality(model, tokenizer, cfg.data), **speed(model, tokenizer, Path(cfg.data.dir), cfg.bench)}


def _measure_saved(directory: Path, cfg: DictConfig, name: str, passes: list) -> dict:
    """The variant as serving sees it: reloaded from disk by load_model (compiled there, if it asks)."""
    from lifecycle.models.load import load_model

    with PeakMemory() as peak:
        model, tokenizer = load_model(directory)
        row = _row(model, tokenizer, cfg, name, " → ".join(p.kind for p in passes), [directory])
    return {**row, "peak_mb": peak.mb}


def _cached_base(sweep: Path | None, inputs: dict) -> dict | None:
    """The base row an earlier job of this sweep measured on the same source, if any."""
    path = sweep / report.BASE if sweep is not None else None
    if path is None or not path.is_file():
        return None
    cached = json.loads(path.read_text())
    return cached if cached.get("inputs") == inputs else None


def _names(cfg: DictConfig) -> tuple[str, Path | None]:
    """The variant's name (its `optimize` choice) and, in a multirun, the sweep directory its rows gather in."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return "+".join(cfg.passes), None
    hydra = HydraConfig.get()
    name = hydra.runtime.choices.get("optimize") or "+".join(cfg.passes)
    return name, Path(hydra.sweep.dir) if hydra.mode == RunMode.MULTIRUN else None
