"""`lifecycle data`: read the corpus, train or load a tokenizer, write packed train/val token shards."""
from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from lifecycle import artifacts, tracking
from lifecycle.config import resolved, validate
from lifecycle.data.corpus import corpus_digest, corpus_files, is_validation, read_documents
from lifecycle.data.shards import token_dtype, write_split
from lifecycle.data.tokenizer import load_pretrained, train_bpe
from lifecycle.errors import DataError


def run(cfg: DictConfig) -> dict:
    validate(cfg, "data")
    started = time.time()
    config = resolved(cfg)
    run_dir = artifacts.start_run(cfg.paths.run_dir, config)

    root, files = corpus_files(cfg.corpus.source, cfg.corpus.path, list(cfg.corpus.extensions))
    docs = list(read_documents(root, files, cfg.corpus.max_bytes))
    if not docs:
        raise DataError(f"corpus {root}: every file is empty; point corpus.path at files with text in them")
    val = [d for d in docs if is_validation(d, cfg.val_fraction)] or docs[-1:]
    val_ids = {d.id for d in val}
    train = [d for d in docs if d.id not in val_ids]
    if not train:
        raise DataError(f"corpus {root}: only {len(docs)} document(s), none left for training; add documents")

    if cfg.tokenizer.kind == "bpe":
        tokenizer = train_bpe((d.text for d in train), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    else:
        tokenizer = load_pretrained(cfg.tokenizer.name_or_path)
    tokenizer.save_pretrained(run_dir / "tokenizer")

    dtype = token_dtype(len(tokenizer))
    train_tokens = write_split(run_dir / "train.bin", (d.text for d in train), tokenizer, dtype)
    val_tokens = write_split(run_dir / "val.bin", (d.text for d in val), tokenizer, dtype)
    n_bytes = sum(len(d.text.encode()) for d in docs)
    metrics = {
        "data/documents": len(docs), "data/val_documents": len(val), "data/bytes": n_bytes,
        "data/train_tokens": train_tokens, "data/val_tokens": val_tokens, "data/vocab_size": len(tokenizer),
        "data/bytes_per_token": round(n_bytes / max(1, train_tokens + val_tokens), 4),
        "data/seconds": round(time.time() - started, 2),
    }
    meta = {"dtype": dtype.name, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "train_tokens": train_tokens, "val_tokens": val_tokens, "bytes": n_bytes,
            "val_document_ids": sorted(val_ids)}
    artifacts.write_json(run_dir / "meta.json", meta)

    logger = tracking.make_logger(cfg.logger, run_dir, "data", cfg.name, config)
    if logger is not None:
        logger.log_metrics(metrics)
    inputs = {"corpus": {"path": str(root), "hash": corpus_digest(docs), "files": len(files)}}
    artifacts.finish_run(run_dir, "data", inputs, metrics, config, started, tracking.run_id(logger))
    tracking.finish(logger)
    _print_summary(run_dir, metrics)
    return metrics


def _print_summary(run_dir: Path, metrics: dict) -> None:
    from rich.console import Console

    Console().print(f"[bold green]data[/] {metrics['data/documents']} documents, "
                    f"{metrics['data/train_tokens']:,} train / {metrics['data/val_tokens']:,} val tokens, "
                    f"vocab {metrics['data/vocab_size']:,} -> {run_dir}")
