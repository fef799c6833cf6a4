"""`lifecycle pretrain`: train a causal LM with Lightning on packed shards; export a transformers model."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import seed_everything
from omegaconf import DictConfig

from lifecycle import artifacts, tracking
from lifecycle.config import build, resolved, validate
from lifecycle.errors import ConfigError
from lifecycle.training.run import make_module, make_trainer, resume_path
from lifecycle.training.samples import generate_samples

STAGE = "pretrain"


def run(cfg: DictConfig) -> dict:
    validate(cfg, STAGE)
    started, config = time.time(), resolved(cfg)
    run_dir, is_zero = Path(cfg.paths.run_dir), rank_zero_only.rank == 0
    if is_zero:
        artifacts.start_run(run_dir, config)
    seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = build(cfg.data)
    datamodule.setup()
    meta = datamodule.meta
    model = build(cfg.model, vocab_size=meta["vocab_size"], bos_token_id=meta["bos_token_id"],
                  eos_token_id=meta["eos_token_id"], pad_token_id=meta["pad_token_id"])
    _check_context(model, cfg.data.seq_len)
    model = build(cfg.strategy)(model)  # pretraining uses `full`; the fine-tuning stage offers the others
    module = make_module(cfg, model)
    resume = resume_path(cfg, STAGE, module)

    logger = tracking.make_logger(cfg.logger, run_dir, STAGE, cfg.name, config)
    trainer, throughput, precision = make_trainer(cfg, run_dir, model, logger, [])
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None,
                weights_only=True)
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    val = trainer.validate(module, datamodule=datamodule, verbose=False, weights_only=True)[0]
    if not is_zero:
        return {}

    model_dir = _export(model, Path(cfg.data.dir) / "tokenizer", run_dir / "model")
    samples = generate_samples(model_dir, list(cfg.samples.prompts), cfg.samples.max_new_tokens,
                               cfg.samples.temperature, cfg.samples.top_k, cfg.seed)
    artifacts.atomic_write(run_dir / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    losses = [r["train/loss"] for r in _history(run_dir) if r.get("train/loss") is not None]
    metrics = {"val/loss": round(val["val/loss"], 4), "val/ppl": round(val["val/ppl"], 3),
               "train/loss_first": round(losses[0], 4) if losses else None,
               "train/loss_last": round(losses[-1], 4) if losses else None,
               "train/steps": trainer.global_step, "train/params": sum(p.numel() for p in model.parameters()),
               "train/precision": precision, **throughput.summary(module.device)}
    if logger is not None:
        logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if hasattr(logger, "log_text"):
            logger.log_text(key="samples", columns=list(samples[0]), data=[list(s.values()) for s in samples])
        tracking.link_lineage(logger, run_dir, {"dataset": Path(cfg.data.dir) / "clean",
                                                "tokenizer": Path(cfg.data.dir) / "tokenizer"},
                              {"model": model_dir}, cfg.name, metrics)
    inputs = {"data": artifacts.input_record(cfg.data.dir)}
    if resume:
        inputs["resumed_from"] = artifacts.input_record(resume)
    artifacts.finish_run(run_dir, STAGE, inputs, metrics, config, started, tracking.run_id(logger))
    tracking.finish(logger)
    _print_summary(run_dir, metrics, samples)
    return metrics


def _check_context(model, seq_len: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the model's context of {limit} positions; lower "
                          "data.seq_len or raise the model's max_position_embeddings / n_positions")


def _export(model, tokenizer_dir: Path, model_dir: Path) -> Path:
    """save_pretrained (safetensors) + the data's tokenizer, written beside and renamed into place."""
    from transformers import AutoTokenizer

    tmp = model_dir.with_name(f".{model_dir.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    os.replace(tmp, model_dir)
    return model_dir


def _history(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _print_summary(run_dir: Path, metrics: dict, samples: list[dict]) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"[bold green]pretrain[/] loss {metrics['train/loss_first']} -> {metrics['train/loss_last']}, "
                  f"val/ppl {metrics['val/ppl']}, {metrics['train/tokens_per_s']:,} tok/s, "
                  f"MFU {metrics['train/mfu']:.1%} -> {run_dir}")
    for s in samples:
        console.print(f"[dim]{s['prompt']!r} ->[/] {s['prompt'] + s['completion']!r}")
