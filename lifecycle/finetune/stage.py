"""`lifecycle finetune`: one strategy (full, LoRA, P-tuning, adapter, ...) on the shared training loop."""
from __future__ import annotations

import math
import time
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig

from lifecycle import artifacts, tracking
from lifecycle.config import build, resolved, validate
from lifecycle.training import checkpoint
from lifecycle.training.instruct_data import CHAT_TEMPLATE
from lifecycle.training.run import make_module, make_trainer, resume_path

STAGE = "finetune"


def run(cfg: DictConfig) -> dict:
    validate(cfg, STAGE)
    started, run_dir, is_zero = time.time(), Path(cfg.paths.run_dir), rank_zero_only.rank == 0
    seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer = _tokenizer(cfg.base.name_or_path)
    datamodule = build(cfg.data, tokenizer=tokenizer)
    datamodule.setup()
    if cfg.epochs is not None:  # the budget in passes over the data decides the step count (and the LR schedule)
        devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1  # "auto": counted as one
        per_step = cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * devices * cfg.trainer.num_nodes
        cfg.trainer.max_steps = max(1, math.ceil(cfg.epochs * len(datamodule.train_set) / per_step))
    config = resolved(cfg)
    if is_zero:
        artifacts.start_run(run_dir, config)

    base = build(cfg.base, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    strategy = build(cfg.strategy)
    model = strategy(base)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    module = make_module(cfg, model)
    resume = resume_path(cfg, STAGE, module)

    logger = tracking.make_logger(cfg.logger, run_dir, STAGE, cfg.name, config)
    best = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/loss", mode="min",
                           save_top_k=1)
    stop = EarlyStopping(monitor="val/loss", patience=cfg.early_stopping.patience,
                         min_delta=cfg.early_stopping.min_delta, mode="min")
    trainer, throughput, precision = make_trainer(cfg, run_dir, base, logger, [best, stop])
    before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)
    if best.best_model_path:  # export the best validation state, not the last one
        module.load_state_dict(checkpoint.load(Path(best.best_model_path))["state_dict"])
    after = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]
    if not is_zero:
        return {}

    outputs = strategy.save(model, run_dir)
    for directory in outputs.values():
        tokenizer.save_pretrained(directory)  # with the chat template, so serving renders chats identically
    metrics = {"finetune/val_loss_before": round(before, 4), "finetune/val_loss_after": round(after, 4),
               "finetune/trainable_params": trainable, "finetune/trainable_share": round(trainable / total, 6),
               "finetune/steps": trainer.global_step, "finetune/stopped_early": bool(stop.stopped_epoch or
                                                                                        stop.wait_count),
               "finetune/epochs": round(trainer.global_step * cfg.data.batch_size / len(datamodule.train_set), 2),
               "finetune/adapter_bytes": _size(outputs.get("adapter") or outputs["model"]),
               "finetune/strategy": cfg.strategy._target_.rsplit(".", 1)[-1], "finetune/precision": precision,
               **{f"finetune/{k}": v for k, v in datamodule.stats.items()},
               **throughput.summary(module.device), "finetune/seconds": round(time.time() - started, 1)}
    if logger is not None:
        logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        tracking.link_lineage(logger, run_dir, {"model": cfg.base.name_or_path, "dataset": Path(cfg.data.dir) / "instruct"},
                              outputs, cfg.name, metrics)  # outputs: {"adapter": dir} and/or {"model": dir}
    inputs = {"base": artifacts.input_record(cfg.base.name_or_path) if Path(cfg.base.name_or_path).exists()
              else {"path": cfg.base.name_or_path}, "data": artifacts.input_record(Path(cfg.data.dir) / "instruct")}
    artifacts.finish_run(run_dir, STAGE, inputs, {**metrics, "outputs": {k: str(v) for k, v in outputs.items()}},
                         config, started, tracking.run_id(logger))
    tracking.finish(logger)
    _print_summary(run_dir, metrics)
    return metrics


def _tokenizer(name_or_path: str):
    """The base model's tokenizer, given a chat template if it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def _print_summary(run_dir: Path, m: dict) -> None:
    from rich.console import Console

    Console().print(f"[bold green]finetune[/] {m['finetune/strategy']}: val/loss {m['finetune/val_loss_before']} -> "
                    f"{m['finetune/val_loss_after']}, {m['finetune/trainable_params']:,} trainable "
                    f"({m['finetune/trainable_share']:.2%}), {m['train/tokens_per_s']:,} tok/s -> {run_dir}")
