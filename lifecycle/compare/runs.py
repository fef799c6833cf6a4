"""Finished runs found on disk (one per manifest.json) and the filters that select among them."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path

from lifecycle.errors import ConfigError

# Inputs that are not lineage: the gate's incumbent is compared against, a resumed checkpoint is the run's own.
NOT_LINEAGE = ("incumbent", "resumed_from")


@dataclass
class Run:
    dir: Path
    stage: str
    created: datetime | None
    name: str
    metrics: dict
    inputs: dict
    config: dict

    def input_paths(self) -> list[Path]:
        """Every input path the manifest records, except those that are not lineage."""
        return [Path(p) for p in _paths({k: v for k, v in self.inputs.items() if k not in NOT_LINEAGE})]

    def strategy(self) -> str | None:
        """The fine-tuning strategy (the `_target_`'s last name: lora, ptuning, ...), if this run has one."""
        if self.metrics.get("finetune/strategy"):
            return str(self.metrics["finetune/strategy"])
        target = (self.config.get("strategy") or {}).get("_target_")
        return target.rsplit(".", 1)[-1] if self.stage == "finetune" and target else None


def _paths(node) -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in ([v] if k == "path" and isinstance(v, str) else _paths(v))]
    if isinstance(node, list):
        return [p for v in node for p in _paths(v)]
    return []


def discover(root: Path) -> list[Run]:
    """Every run directory below root (not descending into a run, nor through the `latest` links)."""
    runs = []
    for here, dirs, files in os.walk(root):  # followlinks=False: `latest` and other links are not walked
        if "manifest.json" in files:
            dirs[:] = []
            run = load(Path(here))
            if run is not None:
                runs.append(run)
        else:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(runs, key=lambda r: (r.created or datetime.min.replace(tzinfo=timezone.utc), str(r.dir)))


def load(run_dir: Path) -> Run | None:
    """The run of a manifest, or None when the file is not a lifecycle manifest (half-written, foreign)."""
    try:
        m = json.loads((run_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or "stage" not in m:
        return None
    config = m.get("config") or {}
    return Run(run_dir.resolve(), m["stage"], _created(m.get("created")), str(config.get("name", "")),
               m.get("metrics") or {}, m.get("inputs") or {}, config)


def _created(text: str | None) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z") if text else None
    except ValueError:
        return None


def moment(value: str | None, key: str) -> datetime | None:
    """An ISO date or time from the config (UTC unless it says otherwise)."""
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"{key}={value}: not an ISO date or time, e.g. 2026-11-01 or 2026-11-01T12:00") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def matches(run: Run, root: Path, filters: dict) -> bool:
    """Whether a candidate run passes every filter that is set."""
    f = filters
    since, until = moment(f["since"], "filters.since"), moment(f["until"], "filters.until")
    rel = os.path.relpath(run.dir, root.resolve())
    return ((f["stage"] is None or run.stage == f["stage"]) and (f["group"] is None or run.name == f["group"])
            and (f["strategy"] is None or run.strategy() == f["strategy"])
            and (since is None or (run.created is not None and run.created >= since))
            and (until is None or (run.created is not None and run.created < until))
            and (f["glob"] is None or fnmatch(rel, f["glob"]) or fnmatch(str(run.dir), f["glob"])))


def describe(filters: dict) -> str:
    """The filters that are set, as the overrides that set them."""
    return ", ".join(f"filters.{k}={v}" for k, v in filters.items() if v is not None) or "no filters"
