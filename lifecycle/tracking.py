"""Experiment tracking: the Lightning loggers the `logger` group builds, and W&B artifact lineage between stages."""
from __future__ import annotations

import os
from pathlib import Path


def wandb_logger(project: str, entity: str | None, tags: list[str], log_model: bool, *, save_dir: str,
                 name: str, group: str, job_type: str, run_config: dict):
    """Lightning's WandbLogger; offline (files under save_dir) unless a W&B key is configured."""
    from lightning.pytorch.loggers import WandbLogger

    offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or not _has_wandb_key()
    logger = WandbLogger(project=project, entity=entity, tags=list(tags), name=name, group=group,
                         job_type=job_type, save_dir=save_dir, offline=offline, log_model=False,
                         config=run_config)
    logger.lifecycle_log_model = log_model
    return logger


def csv_logger(*, save_dir: str, name: str, group: str, job_type: str, run_config: dict):
    """Lightning's CSVLogger writing metrics.csv under save_dir/csv."""
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=save_dir, name="csv", version="")
    logger.log_hyperparams(run_config)
    return logger


def no_logger(*, save_dir: str, name: str, group: str, job_type: str, run_config: dict):
    """No tracker at all."""
    return None


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def run_id(logger) -> str | None:
    """The W&B run id, if this logger is W&B."""
    exp = getattr(logger, "experiment", None) if type(logger).__name__ == "WandbLogger" else None
    return getattr(exp, "id", None)


def finish(logger) -> None:
    if type(logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish()


def make_logger(node, run_dir: Path, stage: str, experiment: str, config: dict):
    """Build the `logger` group's logger for one stage run: W&B group = experiment, job_type = stage."""
    from lifecycle.config import build

    return build(node, save_dir=str(run_dir), name=f"{stage}-{Path(run_dir).name}", group=experiment,
                       job_type=stage, run_config=config, _recursive_=False, _convert_="all")


def alert(logger, title: str, text: str, severity: str) -> bool:
    """A W&B alert (info | warning | critical) when the W&B run is online; False when there is none to send to."""
    if type(logger).__name__ != "WandbLogger" or os.environ.get("WANDB_MODE") in ("offline", "disabled") \
            or not _has_wandb_key():
        return False
    import wandb

    level = {"info": wandb.AlertLevel.INFO, "warning": wandb.AlertLevel.WARN, "critical": wandb.AlertLevel.ERROR}
    logger.experiment.alert(title=title, text=text, level=level[severity])
    return True


def online() -> bool:
    """True when W&B runs would sync live: a key is configured and WANDB_MODE is not offline/disabled."""
    return os.environ.get("WANDB_MODE") not in ("offline", "disabled", "dryrun") and _has_wandb_key()


LINEAGE_FILE = "artifacts.json"


def link_lineage(logger, run_dir: Path, inputs: dict, outputs: dict, name: str, metadata: dict | None = None) -> None:
    """W&B lineage: use the artifacts the inputs came from, log the outputs ({type[:label]: path} both ways).

    An input is a draft artifact of file:// references with checksums, named as its producer logged it (found in
    the producer's artifacts.json), so its digest equals the producer's version and W&B links the two; offline
    runs record the use (`use_after_commit`) for `wandb sync`, since `run.use_artifact` refuses offline."""
    if type(logger).__name__ != "WandbLogger" or not getattr(logger, "lifecycle_log_model", False):
        return
    run = logger.experiment
    for key, path in inputs.items():
        if path is not None and Path(path).exists():
            _use(run, _input_artifact(key, Path(path).resolve()))
    logged = []
    for key, path in outputs.items():
        kind, _, label = key.partition(":")
        artifact_name = "-".join(x for x in (kind, name, label) if x)
        _log_output(run, Path(path), artifact_name, kind, metadata or {})
        logged.append({"name": artifact_name, "type": kind, "path": str(Path(path).resolve())})
    from lifecycle.artifacts import write_json

    write_json(Path(run_dir) / LINEAGE_FILE, logged)


def _input_artifact(key: str, path: Path):
    """A reference artifact named and typed as the producer logged `path`, else after the input's key."""
    import json

    import wandb

    kind, _, label = key.partition(":")
    artifact_name = f"{kind}-{label or path.name}"
    for parent in path.parents:
        record = parent / LINEAGE_FILE
        if record.is_file():
            match = [e for e in json.loads(record.read_text()) if e["path"] == str(path)]
            if match:
                artifact_name, kind = match[0]["name"], match[0]["type"]
            break
    artifact = wandb.Artifact(name=_clean(artifact_name), type=kind)
    artifact.add_reference(path.as_uri(), checksum=True)
    return artifact


def _use(run, artifact) -> None:
    if run.settings._offline:
        run._log_artifact(artifact, is_user_created=True, use_after_commit=True)  # what use_artifact does online
    else:
        run.use_artifact(artifact)


def _log_output(run, path: Path, name: str, kind: str, metadata: dict) -> None:
    import wandb

    artifact = wandb.Artifact(name=_clean(name), type=kind, metadata=metadata)
    if path.is_dir():
        artifact.add_dir(str(path))
    else:
        artifact.add_file(str(path))
    run.log_artifact(artifact)


def _clean(name: str) -> str:
    """W&B artifact names allow letters, digits, dashes, underscores and dots."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:128]


def record_paths(record: dict, label: str = "") -> dict:
    """A manifest's inputs record ({"model": {"path", "hash"}, "adapter/x": ..., "small": {...}}) as link_lineage
    inputs ({"model": path, "adapter:x": path, "model:small": path}); a "base" is a model."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict) and "path" in value:
            kind, _, sub = key.partition("/")
            kind, sub = ("model", "base") if kind == "base" else (kind, sub)
            out[":".join(x for x in (kind, "-".join(y for y in (label, sub) if y)) if x)] = value["path"]
        elif isinstance(value, dict):
            out |= record_paths(value, key)
    return out
