"""Runs joined by lineage from their manifests' inputs: one row per candidate model (a pretrain, finetune or optimize
run) with its ancestors' figures (data run, base model, ...) and what was measured on it (evaluations, serving,
cost). data -> pretrain -> finetune -> optimize make models; evaluate, serve and cost runs observe one."""
from __future__ import annotations

import os
from pathlib import Path

from lifecycle.compare.runs import Run

MAKERS = ("data", "pretrain", "finetune", "optimize")  # in lineage order: a later one derives from an earlier one
CANDIDATES = MAKERS[1:]
OBSERVERS = ("evaluate", "serve", "cost")
OWN_PREFIX = {"evaluate": "eval"}  # evaluate's metrics are eval/...


class Lineage:
    """An index of runs by directory, answering "which run wrote this path" and "what derives from what"."""

    def __init__(self, runs: list[Run]):
        self.runs = runs
        self.by_dir = {r.dir: r for r in runs}

    def owner(self, path: Path) -> Run | None:
        """The run whose directory holds `path` (the path itself or one of its parents)."""
        path = Path(os.path.abspath(path))
        for p in (path, *path.parents):
            if p in self.by_dir:
                return self.by_dir[p]
        return None

    def parent(self, run: Run) -> Run | None:
        """The most derived model-making run among the runs this run read (an adapter's run before its base)."""
        owners = [o for o in (self.owner(p) for p in run.input_paths()) if o is not None and o is not run]
        makers = [o for o in owners if o.stage in MAKERS]
        return max(makers, key=lambda o: MAKERS.index(o.stage)) if makers else None

    def chain(self, run: Run) -> list[Run]:
        """run, its parent, the parent's parent, ... (a cycle or a dangling path ends the chain)."""
        out: list[Run] = []
        while run is not None and run not in out:
            out.append(run)
            run = self.parent(run)
        return out

    def observers(self, run: Run, stage: str) -> list[Run]:
        """The `stage` runs (evaluate, serve, cost) whose subject is `run`, newest last."""
        return [o for o in self.runs if o.stage == stage and self.parent(o) is run]


def row(lineage: Lineage, candidate: Run, root: Path) -> dict:
    """One candidate's row: identity, then each ancestor's metrics, then its newest evaluation, serving and cost."""
    chain = lineage.chain(candidate)
    out = {"run": os.path.relpath(candidate.dir, root.resolve()), "stage": candidate.stage, "group": candidate.name,
           "strategy": candidate.strategy() or "",
           "created": candidate.created.isoformat() if candidate.created else "",
           "lineage": " <- ".join(f"{r.stage}:{r.dir.name}" for r in chain[1:])}
    for run in reversed(chain):  # ancestors first, so the candidate's own figures win a clash
        out |= flat(run)
    for stage in OBSERVERS:
        seen = lineage.observers(candidate, stage)
        if seen:
            out |= flat(seen[-1]) | {f"{stage}/run": os.path.relpath(seen[-1].dir, root.resolve())}
    return out


def flat(run: Run) -> dict:
    """A run's scalar metrics under its stage's prefix (pretrain/val/ppl, finetune/..., eval/...); a gate as its
    verdict."""
    prefix = OWN_PREFIX.get(run.stage, run.stage)
    out = {}
    for k, v in run.metrics.items():
        if k == "gate" and isinstance(v, dict):
            out[f"{prefix}/gate"] = v.get("verdict")
        elif isinstance(v, (int, float, str)) or v is None:
            out[k if k.startswith(f"{prefix}/") else f"{prefix}/{k}"] = v
    return out


def history(run: Run) -> list[dict]:
    """The run's own per-step metrics history (metrics.jsonl beside its manifest), if it wrote one."""
    import json

    path = run.dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
