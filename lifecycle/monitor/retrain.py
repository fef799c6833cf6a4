"""The retrain loop an alert starts: logged traffic -> data -> finetune -> evaluate (gate) -> promote.

    collect    prompt/response pairs served since production was promoted (the request log's text, so the server
               must run with usage.log_text=true), negatively rated and empty answers left out -> traffic.jsonl
    data       `lifecycle data` on it: cleaning, PII, exact dedup (instruct.scrub), the instruct split, with the
               production model's tokenizer
    finetune   `lifecycle finetune` from the production model: strategy=lora_continue on its adapter (any strategy
               through retrain.finetune_overrides)
    incumbent  `lifecycle evaluate` of production on the new held-out data: the gate compares like with like
    candidate  `lifecycle evaluate ... gate.incumbent=<incumbent run>`; exit 3 = gate failed, nothing promoted
    promote    lifecycle.monitor.registry.promote: the server's alias moves to the new version

Each stage runs as its own process (`python -m lifecycle.<stage>`) under <output_root>/retrain/<stamp>/, so the
main outputs' `latest` links never move. Failures before anything runs (no production, no logged text, too few
pairs) raise RetrainError; a step that fails ends the loop with outcome "failed" (or "gate_failed") in the returned
timeline, and production stays what it was.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

from lifecycle import artifacts
from lifecycle.errors import LifecycleError
from lifecycle.models.adapters import is_adapter_dir, read_config
from lifecycle.monitor import registry
from lifecycle.monitor.drift import open_usage
from lifecycle.serve.usage import feedback_table, requests_table

GATE_FAILED = 3


class RetrainError(LifecycleError):
    """The retrain loop cannot start; nothing ran and production is unchanged."""


def run(cfg, alert: dict) -> dict:
    """Run the loop for `alert`; returns the timeline {steps: {name: {start, end, seconds, run_dir, exit}}, ...}."""
    r, started = cfg.retrain, time.time()
    prod = registry.production(cfg.registry)
    if prod is None:
        raise RetrainError(f"no production model in {cfg.registry.path}: register and promote one first")
    root = (Path(cfg.paths.output_root) / "retrain" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    timeline = {"alert": alert, "production": prod["version"], "dir": str(root), "steps": {}, "outcome": None}
    t0 = time.time()
    pairs = collect(r.db, prod["since"], r.min_pairs, root / "traffic.jsonl")
    timeline["steps"]["collect"] = _step(t0, str(root / "traffic.jsonl"), 0) | {"pairs": pairs}
    base = prod["base"] or (read_config(Path(prod["path"])).get("base_model_name_or_path")
                            if is_adapter_dir(prod["path"]) else None)
    common = [f"paths.output_root={root}", *r.shared_overrides]
    plan = _plan(cfg, prod, base, root, common)
    for name, (stage, args) in plan.items():
        code = _run_stage(timeline, name, stage, root / stage / name, args, r.timeout_s)
        if code == GATE_FAILED and name == "candidate":
            return _finish(timeline, root, started, "gate_failed", "the candidate did not pass the gate: "
                           + _gate_reason(root / "evaluate" / "candidate") + f"; production stays {prod['version']}")
        if code != 0:
            log = root / f"{name}.log"
            return _finish(timeline, root, started, "failed", f"step {name} (lifecycle {stage}) exited {code}; "
                           f"production stays {prod['version']}. Its log: {log}\n{_tail(log)}")
    t0 = time.time()
    adapter = root / "finetune" / "finetune" / "adapter"
    version = registry.register(cfg.registry, str(adapter), base, run=str(root / "finetune" / "finetune"),
                                eval_run=str(root / "evaluate" / "candidate"),
                                metrics=_metrics(root / "evaluate" / "candidate"))
    try:
        promoted = registry.promote(cfg.registry, version)
    except LifecycleError as e:
        timeline["steps"]["promote"] = _step(t0, None, 1)
        return _finish(timeline, root, started, "failed", f"promotion of {version} failed: {e}")
    timeline["steps"]["promote"] = _step(t0, str(adapter), 0) | promoted
    timeline["version"] = version
    return _finish(timeline, root, started, "promoted", None)


def collect(db_url: str, since: float, min_pairs: int, out: Path) -> int:
    """Write the pairs served since `since` to `out` (JSONL); the number written."""
    rows, negative = _logged(db_url, since)
    if not rows:
        raise RetrainError(f"no traffic logged in {db_url} since production was promoted "
                           f"({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}): nothing to retrain on")
    texts = [r for r in rows if r["text"]]
    if not texts:
        raise RetrainError(f"{len(rows)} requests logged since production was promoted, but none with its text: the "
                           "server keeps prompts and answers only with usage.log_text=true (lifecycle serve "
                           "usage.log_text=true); retraining needs them")
    pairs = [{"id": r["request_id"] or f"row-{r['id']}", "prompt": r["text"]["prompt"],
              "response": r["text"]["output"], "text": r["text"]["prompt"] + "\n" + r["text"]["output"],
              "source": "traffic"}
             for r in texts if r["request_id"] not in negative and r["text"]["output"].strip()
             and r["text"]["prompt"].strip()]
    if len(pairs) < min_pairs:
        raise RetrainError(f"only {len(pairs)} usable prompt/response pairs since production was promoted "
                           f"({len(texts)} logged with text, {len(negative)} rated negatively); retrain.min_pairs "
                           f"is {min_pairs}")
    from lifecycle.data.instruct import write_jsonl

    return write_jsonl(out, pairs)


def _logged(db_url: str, since: float) -> tuple[list[dict], set[str]]:
    engine, tables = open_usage(db_url)
    try:
        t, f = requests_table, feedback_table
        with engine.connect() as conn:
            query = select(t.c.id, t.c.request_id, t.c.text, t.c.stats).where(t.c.ts >= since, t.c.status == 200)
            rows = [dict(x._mapping) for x in conn.execute(query.order_by(t.c.ts)) if x.stats]  # generations only
            negative = {x[0] for x in conn.execute(select(f.c.request_id).where(f.c.negative.is_(True)))} \
                if f.name in tables else set()
        return rows, negative
    finally:
        engine.dispose()


def _plan(cfg, prod: dict, base: str | None, root: Path, common: list[str]) -> dict[str, tuple[str, list[str]]]:
    """Each step's stage and overrides, in order."""
    r, data_dir = cfg.retrain, root / "data" / "data"
    jsonl = root / "traffic.jsonl"
    tokenizer = base or prod["path"]
    data = [*common, "source=[jsonl]", f"sources.jsonl.path={jsonl}", "sources.jsonl.kind=chat",
            "tokenizer=hf_pretrained", f"tokenizer.name_or_path={tokenizer}", "instruct.from_code=false",
            f"instruct.files=[{jsonl}]", "instruct.scrub=true", *r.data_overrides]
    start = ["strategy=lora_continue", f"strategy.path={prod['path']}", f"base.name_or_path={base}"] if base \
        else [f"base.name_or_path={prod['path']}"]  # a full model: a fresh adapter on it (strategy override)
    finetune = [*common, f"data.dir={data_dir}", *start, *r.finetune_overrides]
    target = [f"target.base={base}"] if base else []
    evaluate = [*common, f"data.dir={data_dir}", *target, *r.evaluate_overrides]
    rules = "gate.rules=[" + ",".join("{" + f"metric:'{x.metric}',change:{x.change},op:'{x.op}',value:{x.value}"
                                      + "}" for x in r.gate_rules) + "]"
    return {"data": ("data", data), "finetune": ("finetune", finetune),
            "incumbent": ("evaluate", [*evaluate, f"target.model={prod['path']}", "gate.incumbent=null"]),
            "candidate": ("evaluate", [*evaluate, f"target.model={root / 'finetune' / 'finetune' / 'adapter'}",
                                       f"gate.incumbent={root / 'evaluate' / 'incumbent'}", rules])}


def _run_stage(timeline: dict, name: str, stage: str, run_dir: Path, args: list[str], timeout_s: float) -> int:
    """`python -m lifecycle.<stage>` with its output in <root>/<name>.log; its exit status (124: timed out)."""
    t0, log = time.time(), run_dir.parent.parent / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", f"lifecycle.{stage}", f"hydra.run.dir={run_dir}", *args]
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd[2:]) + "\n")
        out.flush()
        try:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = 124
    timeline["steps"][name] = _step(t0, str(run_dir), code)
    return code


def _step(t0: float, run_dir: str | None, code: int) -> dict:
    end = time.time()
    return {"start": round(t0, 3), "end": round(end, 3), "seconds": round(end - t0, 2), "run_dir": run_dir,
            "exit": code}


def _finish(timeline: dict, root: Path, started: float, outcome: str, error: str | None) -> dict:
    timeline |= {"outcome": outcome, "error": error, "seconds": round(time.time() - started, 2)}
    artifacts.write_json(root / "timeline.json", timeline)
    return timeline


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["metrics"] if (run_dir / "manifest.json").is_file() \
        else {}


def _gate_reason(run_dir: Path) -> str:
    from lifecycle.evaluate.gate import failures

    verdict = _metrics(run_dir).get("gate")
    return failures(verdict) if verdict else f"no verdict in {run_dir}"


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else ""
