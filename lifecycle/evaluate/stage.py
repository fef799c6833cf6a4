"""`lifecycle evaluate`: held-out metrics, benchmark tasks, samples and contamination for one model; then the gate."""
from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lifecycle import artifacts, tracking
from lifecycle.config import resolved, validate
from lifecycle.errors import DataError, GateFailed
from lifecycle.evaluate import contamination, gate, intrinsic, report, tasks
from lifecycle.evaluate.samples import complete, generate
from lifecycle.evaluate.target import load, resolve

STAGE = "evaluate"


def run(cfg: DictConfig) -> dict:
    validate(cfg, STAGE)
    started, config = time.time(), resolved(cfg)
    data_dir, names = Path(cfg.data.dir), list(cfg.tasks.names)
    # Everything that can be wrong is checked before a model loads: the target, the incumbent, the task names.
    target = resolve(cfg.target.model, cfg.target.base, cfg.target.endpoint, cfg.target.endpoint_model,
                     cfg.target.endpoint_key_env)
    incumbent = gate.incumbent_metrics(cfg.gate.incumbent)
    _require_data_run(data_dir)
    run_dir = artifacts.start_run(cfg.paths.run_dir, config)
    items = tasks.write_ours(names, data_dir, run_dir / "tasks", cfg.seed, context_lines=cfg.tasks.context_lines,
                             choices=cfg.tasks.choices, max_items=cfg.tasks.max_items)
    manager = tasks.manager(names, run_dir / "tasks") if names else None
    shares = contamination.shares(tasks.item_texts(names, manager), data_dir, cfg.contamination.ngram) \
        if manager else {}

    held_out, results, samples = _evaluate(cfg, target, manager)
    metrics = {f"eval/{split}/{k}": v for split, values in held_out.items() for k, v in values.items()}
    metrics |= tasks.metrics(results) if results else {}
    metrics |= {f"eval/task/{name}/contamination": share for name, share in shares.items()}
    metrics = {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
    verdict = None
    if incumbent is not None:
        verdict = {"incumbent": str(Path(cfg.gate.incumbent).resolve()),
                   **gate.check(metrics, incumbent, OmegaConf.to_container(cfg.gate.rules, resolve=True))}
        metrics["eval/gate/passed"] = int(verdict["verdict"] == "pass")

    evaluation = {"target": target.record(), "metrics": metrics, "gate": verdict, "samples": samples,
                  "items": {name: len(rows) for name, rows in items.items()},
                  "lm_eval": _harness_record(results)}
    artifacts.write_json(run_dir / "eval.json", evaluation)
    artifacts.atomic_write(run_dir / "samples.jsonl", "".join(json.dumps(x) + "\n" for x in samples))
    artifacts.atomic_write(run_dir / "summary.md", report.markdown(metrics, verdict, str(target.path)))
    logger = tracking.make_logger(cfg.logger, run_dir, STAGE, cfg.name, config)
    if logger is not None:
        logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        tracking.link_lineage(logger, run_dir, tracking.record_paths(target.record()),
                              {"evaluation": run_dir / "eval.json"}, cfg.name, metrics)
        if hasattr(logger, "log_text") and samples:
            logger.log_text(key="samples", columns=list(samples[0]), data=[list(x.values()) for x in samples])
    inputs = {"target": target.record(), "data": artifacts.input_record(data_dir)}
    if verdict is not None:
        inputs["incumbent"] = {"path": verdict["incumbent"]}
    artifacts.finish_run(run_dir, STAGE, inputs, {**metrics, "gate": verdict}, config, started,
                         tracking.run_id(logger), promote=verdict is None or verdict["verdict"] == "pass")
    tracking.finish(logger)
    report.print_tables(metrics, verdict, samples, run_dir)
    if verdict is not None and verdict["verdict"] == "fail":
        raise GateFailed(f"gate failed against {verdict['incumbent']}: {gate.failures(verdict)} "
                         f"(every rule: {run_dir / 'summary.md'}; {STAGE}/latest is unchanged)")
    return metrics


def _require_data_run(data_dir: Path) -> None:
    if not (data_dir / "meta.json").is_file():
        raise DataError(f"data.dir={data_dir}: not a finished `lifecycle data` run (no meta.json); run `lifecycle "
                        "data` first or set data.dir=outputs/data/<run> (the run the model was trained on)")


def _evaluate(cfg: DictConfig, target, manager) -> tuple[dict, dict | None, list[dict]]:
    """(held-out metrics per split, lm-eval's results, samples) of a local model or adapter, or of an endpoint."""
    t, d, s = cfg.tasks, cfg.data, cfg.samples
    task_args = (list(t.names), manager, t.num_fewshot, t.limit, t.batch_size, cfg.seed)
    sampling = (list(s.prompts), s.max_new_tokens, s.temperature, s.top_k, cfg.seed)
    if target.kind == "endpoint":  # no held-out metrics: they need the served model's log-probs of whole texts
        where = (target.endpoint, target.endpoint_model, target.headers())
        results = tasks.evaluate_endpoint(*where, target.path, *task_args) if manager else None
        return {}, results, complete(*where, *sampling)
    model, tokenizer = load(target)
    held_out = {"general": intrinsic.general(model, tokenizer, Path(d.dir), d.seq_len, d.batch_size, d.val_batches),
                "domain": intrinsic.domain(model, tokenizer, Path(d.dir), d.batch_size, d.val_batches)}
    results = tasks.evaluate_model(model, tokenizer, *task_args) if manager else None
    return held_out, results, generate(model, tokenizer, *sampling)


def _harness_record(results: dict | None) -> dict | None:
    """What lm-eval reported, minus its environment dump."""
    if results is None:
        return None
    keep = ("results", "groups", "group_subtasks", "n-shot", "n-samples", "versions", "higher_is_better",
            "lm_eval_version")
    return {k: results[k] for k in keep if k in results}
