"""Experiment tracking: the Lightning loggers the `logger` group builds, and the final model artifact."""
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


def log_dir_artifact(logger, directory: Path, name: str, kind: str, metadata: dict) -> None:
    """Log a directory (model, tokenizer, dataset) as a W&B artifact of type `kind`, when the logger asks for it."""
    if type(logger).__name__ != "WandbLogger" or not getattr(logger, "lifecycle_log_model", False):
        return
    import wandb

    artifact = wandb.Artifact(name=name, type=kind, metadata=metadata)
    artifact.add_dir(str(directory))
    logger.experiment.log_artifact(artifact)


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
