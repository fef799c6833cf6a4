"""What the training stages (pretrain, finetune) share: the Trainer, its callbacks and resuming."""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from omegaconf import DictConfig

from lifecycle.config import build
from lifecycle.hardware import model_flops_per_token, resolve_precision
from lifecycle.training import checkpoint
from lifecycle.training.callbacks import Throughput
from lifecycle.training.module import CausalLM


def make_module(cfg: DictConfig, model, teacher=None, temperature: float = 2.0, alpha: float = 0.5) -> CausalLM:
    """The one LightningModule, with the configured optimizer, schedule and non-finite-loss policy (and a teacher
    to distill from, if given)."""
    return CausalLM(model, build(cfg.optimizer), build(cfg.scheduler), cfg.train.nonfinite,
                    cfg.train.max_skipped_steps, cfg.train.restore_rng, teacher, temperature, alpha,
                    cfg.train.compile, cfg.train.fused_ops)


def resume_path(cfg: DictConfig, stage: str, module: CausalLM) -> Path | None:
    """The checkpoint `ckpt_path` names (`last` = newest of this stage), refused if it does not fit `module`."""
    if not cfg.ckpt_path:
        return None
    path = checkpoint.find_resume(cfg.ckpt_path, Path(cfg.paths.output_root) / stage)
    checkpoint.check_compatible(path, module)
    return path


def make_trainer(cfg: DictConfig, run_dir: Path, model, logger, callbacks: list):
    """The configured Lightning Trainer with lifecycle's checkpointing, throughput/MFU and progress bar."""
    precision = resolve_precision(cfg.precision.value, cfg.trainer.accelerator)
    ckpt_dir = run_dir / "checkpoints"
    checkpoint.clean_stale_temps(ckpt_dir)
    throughput = Throughput(model_flops_per_token(model, cfg.data.seq_len), cfg.train.peak_flops,
                            run_dir / "metrics.jsonl", precision)
    periodic = ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:06d}", auto_insert_metric_name=False,
                               every_n_train_steps=cfg.train.ckpt_every_n_steps, save_last=True, save_top_k=2,
                               monitor="step", mode="max")
    trainer = build(cfg.trainer, precision=precision, callbacks=[periodic, throughput, RichProgressBar(), *callbacks],
                    logger=logger or False, plugins=[checkpoint.AtomicCheckpointIO()], default_root_dir=str(run_dir))
    return trainer, throughput, precision
