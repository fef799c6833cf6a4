"""`lifecycle data`: sources -> clean/filter/scrub (parallel, cached) -> dedup/decontam -> tokenizer -> shards."""
from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from omegaconf import DictConfig

from lifecycle import artifacts, tracking
from lifecycle.config import build, resolved, validate
from lifecycle.data import instruct
from lifecycle.data.corpus_writer import read_shards
from lifecycle.data.decontam import Decontaminator
from lifecycle.data.document import Skips
from lifecycle.data.process import Job, Worker, cache_key, init_worker, run_job
from lifecycle.data.profile import Profile
from lifecycle.data.progress import doc_size, progress, unit_size
from lifecycle.data.report import Report
from lifecycle.data.select import select
from lifecycle.data.shards import token_dtype, write_split
from lifecycle.data.spans import unit_bytes
from lifecycle.data.tokenizer import load_pretrained, train_bpe
from lifecycle.errors import DataError

STAGE = "data"


def run(cfg: DictConfig) -> dict:
    validate(cfg, STAGE)
    started, config = time.time(), resolved(cfg)
    run_dir = artifacts.start_run(cfg.paths.run_dir, config)
    report = Report()

    sources = {name: build(node, name=name) for name, node in cfg.sources.items()}
    steps = [build(node) for node in cfg.steps.values()]
    near = build(cfg.dedup) if cfg.dedup else None
    jobs = _plan(sources, cfg, artifacts.config_digest({k: config[k] for k in ("steps", "dedup")}), report)
    mine = [j for i, j in enumerate(jobs) if i % cfg.partition.count == cfg.partition.index]
    with report.phase("process"):
        results = _process(mine, Worker(sources, steps, near), cfg.workers)
    report.add_units(results)
    report.log_skips()
    if cfg.partition.only_units:
        artifacts.write_json(run_dir / "report.json", report.to_dict())
        return report.metrics(time.time() - started)  # a partial run: no manifest, `latest` untouched
    artifacts.write_json(run_dir / "report.json", report.to_dict())  # rewritten at the end; here for failures
    if not report.docs_out:
        raise DataError(f"no documents survived reading and filtering ({report.docs_in} read from "
                        f"{len(jobs)} units); see {run_dir / 'report.json'} for the reasons")

    missing = [j.key for j in jobs if not j.out.with_suffix(".json").is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(jobs)} units are not processed yet (first: {missing[0]}); run the "
                        "other partitions (partition.index) first, or run without partition.* to process them here")
    decontam = Decontaminator(cfg.decontam.references, cfg.decontam.ngram)
    collector = instruct.CodeCollector(cfg.instruct.min_body_lines, cfg.instruct.max_chars, run_dir / "instruct") \
        if cfg.instruct.from_code else None
    with report.phase("dedup"):
        selected = select([j.out for j in jobs], cfg.exact_dedup, near, decontam if decontam.active else None,
                          cfg.val_fraction, run_dir / "clean", run_dir / "dedup", collector)
    report.add_selection(selected)
    if not selected["docs"]["train"] or not selected["docs"]["val"]:
        raise DataError(f"after deduplication {selected['docs']} documents are left; a tokenizer and both "
                        "splits need at least one each: add documents or raise val_fraction")

    with report.phase("tokenizer"):
        tokenizer = _tokenizer(cfg, read_shards(selected["paths"]["train"]))
        tokenizer.save_pretrained(run_dir / "tokenizer")
    report.vocab_size = len(tokenizer)
    profile, dtype, tokens = Profile(len(tokenizer)), token_dtype(len(tokenizer)), {}
    with report.phase("tokenize"):
        for split in ("train", "val"):
            docs = progress(read_shards(selected["paths"][split]), selected["docs"][split], split, doc_size)
            tokens[split] = write_split(run_dir / f"{split}.bin", docs, tokenizer, dtype,
                                        profile if split == "train" else None)
    report.tokens = tokens
    report.instruct = _instruct(cfg, collector, run_dir / "instruct", report.read_skips, steps)

    meta = {"dtype": dtype.name, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "train_tokens": tokens["train"], "val_tokens": tokens["val"], "documents": selected["docs"]}
    artifacts.write_json(run_dir / "meta.json", meta)
    artifacts.write_json(run_dir / "profile.json", profile.to_dict())
    artifacts.write_json(run_dir / "report.json", report.to_dict())
    metrics = report.metrics(time.time() - started)

    logger = tracking.make_logger(cfg.logger, run_dir, STAGE, cfg.name, config)
    if logger is not None:
        logger.log_metrics(metrics)
        report.log_tables(logger)
        outputs = {"dataset": run_dir / "clean", "tokenizer": run_dir / "tokenizer", "dataset:instruct": run_dir / "instruct"}
        tracking.link_lineage(logger, run_dir, {}, {k: p for k, p in outputs.items() if p.exists()}, cfg.name, metrics)
    inputs = {name: {"units": [[k, fp] for (s, k, fp) in report.units if s == name]} for name in sources}
    artifacts.finish_run(run_dir, STAGE, inputs, metrics, config, started, tracking.run_id(logger))
    tracking.finish(logger)
    report.print_summary(run_dir)
    return metrics


def _plan(sources: dict, cfg: DictConfig, settings: str, report: Report) -> list[Job]:
    """Every unit of every source, up to max_bytes, each with its cache location."""
    jobs, listed = [], 0
    for name, source in sources.items():
        for key, fingerprint in source.units():
            size = unit_bytes(key)
            if cfg.max_bytes is not None and listed >= cfg.max_bytes:
                break
            listed += size
            out = Path(cfg.cache_dir) / name / cache_key(name, key, fingerprint, settings)
            jobs.append(Job(name, key, fingerprint, out))
            report.units.append((name, key, fingerprint))
    return jobs


def _process(jobs: list[Job], worker: Worker, workers: int) -> list[dict]:
    if workers <= 1:
        init_worker(worker)
        return list(progress(map(run_job, jobs), len(jobs), "process", unit_size))
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=init_worker, initargs=(worker,)) as pool:
        return list(progress(pool.imap(run_job, jobs, chunksize=4), len(jobs), "process", unit_size))


def _tokenizer(cfg: DictConfig, docs):
    if cfg.tokenizer.kind == "bpe":
        return train_bpe((d.text for d in docs), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    return load_pretrained(cfg.tokenizer.name_or_path)


def _instruct(cfg: DictConfig, collector, out_dir: Path, skips: Skips, steps: list) -> dict:
    """instruct/{train,val}.jsonl: pairs from the corpus's code follow their document's split (validation pairs
    come from held-out documents); pairs from the listed instruction files are split by a hash of their id."""
    user = [r for path in cfg.instruct.files for r in instruct.read_jsonl(Path(path).expanduser(), skips)]
    if cfg.instruct.scrub:  # e.g. logged traffic for retraining: the corpus's cleaning and PII rules apply too
        user = instruct.scrub(user, steps, skips)
    pairs = dict(zip(("train", "val"), instruct.split(user, cfg.instruct.val_fraction)))
    if collector is None:
        return {s: instruct.write_jsonl(out_dir / f"{s}.jsonl", pairs[s]) for s in pairs}
    return {s: collector.finish(s, out_dir / f"{s}.jsonl", pairs[s]) for s in pairs}  # the corpus's pairs first
