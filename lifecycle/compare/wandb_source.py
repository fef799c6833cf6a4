"""Rows from the W&B API (online only): one per W&B run of a candidate stage, from its summary and config. W&B holds
no lifecycle lineage, so these rows are not joined; local manifests (backend=local) are."""
from __future__ import annotations

import os
from lifecycle.compare.runs import moment
from lifecycle.errors import ConfigError, LifecycleError

CANDIDATES = ("pretrain", "finetune", "optimize")


def rows(path: str | None, filters: dict) -> tuple[list[dict], dict[str, list[dict]]]:
    """(rows, train/loss histories by row label) of the W&B runs at entity/project `path` passing `filters`."""
    if not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("backend=wandb reads the W&B API and needs WANDB_API_KEY in the environment; offline runs "
                          "are compared from their manifests with backend=local")
    import wandb

    query = {k: v for k, v in (("group", filters["group"]), ("jobType", filters["stage"])) if v is not None}
    try:
        api = wandb.Api(timeout=20)
        found = list(api.runs(path or f"{api.default_entity}/lifecycle", filters=query))
    except Exception as e:  # the client raises many kinds (HTTP, auth, DNS); each means the same to the user
        raise LifecycleError(f"the W&B API at {os.environ.get('WANDB_BASE_URL', 'api.wandb.ai')} is unreachable or "
                             f"refused the request ({type(e).__name__}: {e}); compare local runs with backend=local")
    out, curves = [], {}
    for run in found:
        row = _row(run)
        if row["stage"] in CANDIDATES and _passes(row, filters):
            out.append(row)
            curves[f"{row['stage']} {row['strategy']} {run.id}"] = [
                {"step": i, "train/loss": h["train/loss"]} for i, h in enumerate(run.scan_history(keys=["train/loss"]))]
    return out, curves


def _row(run) -> dict:
    target = ((run.config or {}).get("strategy") or {}).get("_target_", "")
    summary = {k: v for k, v in run.summary._json_dict.items() if isinstance(v, (int, float, str))
               and not k.startswith("_")}
    return {"run": f"wandb:{run.path[-1] if isinstance(run.path, list) else run.id}", "stage": run.job_type or "",
            "group": run.group or "", "strategy": target.rsplit(".", 1)[-1] if run.job_type == "finetune" else "",
            "created": run.created_at, "lineage": "", **summary}


def _passes(row: dict, filters: dict) -> bool:
    created = moment(str(row["created"]).replace("Z", "+00:00"), "created") if row["created"] else None
    since, until = moment(filters["since"], "filters.since"), moment(filters["until"], "filters.until")
    return ((filters["strategy"] is None or row["strategy"] == filters["strategy"])
            and (since is None or (created is not None and created >= since))
            and (until is None or (created is not None and created < until)))
