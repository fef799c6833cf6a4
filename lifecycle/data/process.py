"""Per-unit processing in worker processes: read -> clean -> filter -> scrub -> MinHash, cached by content hash."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lifecycle.data.dedup import exact_key
from lifecycle.data.document import Document, Drop, Skips

FORMAT = 2  # bump when a unit's files change shape, so old cache entries are not read
SAMPLES_PER_REASON = 3
SAMPLE_CHARS = 400


@dataclass
class Job:
    source: str       # configured source name
    key: str          # the unit within the source (a file, a row range)
    fingerprint: str  # content hash of the unit
    out: Path         # <cache>/<hash>: .jsonl.gz (kept documents), .sig.npy (MinHash), .json (stats, written last)


def cache_key(job_source: str, key: str, fingerprint: str, settings: str) -> str:
    """A unit's outputs depend on its content and on the processing settings, nothing else."""
    parts = [str(FORMAT), job_source, key, fingerprint, settings]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


class Worker:
    """What each worker process holds: the sources, the steps and the MinHash settings (sent once)."""

    def __init__(self, sources: dict, steps: list, near):
        self.sources, self.steps, self.near = sources, steps, near

    def run(self, job: Job) -> dict[str, Any]:
        stats_path = job.out.with_suffix(".json")
        if stats_path.is_file():  # finished by an earlier (possibly interrupted) run
            return {**json.loads(stats_path.read_text()), "cached": True}
        started, skips = time.perf_counter(), Skips()
        counts: Counter[str] = Counter()
        drops: dict[str, Counter] = defaultdict(Counter)
        samples: dict[str, list] = defaultdict(list)
        pii: Counter[str] = Counter()
        kept, signatures, digests = [], [], []
        for doc in self.sources[job.source].read(job.key, skips):
            counts["docs_in"] += 1
            counts["bytes_in"] += len(doc.text.encode())
            result = self._apply(doc, counts)
            if isinstance(result, tuple):
                reason, dropped = result
                drops[reason]["docs"] += 1
                drops[reason]["bytes"] += len(dropped.text.encode())
                if len(samples[reason]) < SAMPLES_PER_REASON:
                    samples[reason].append({"id": dropped.id, "text": dropped.text[:SAMPLE_CHARS]})
                continue
            pii.update(result.metadata.get("pii", {}))
            counts["docs_out"] += 1
            counts["bytes_out"] += len(result.text.encode())
            kept.append(result)
            digests.append(np.frombuffer(exact_key(result.text), dtype=np.uint8))
            if self.near is not None:
                signatures.append(self.near.signature(result.text))
        _write_unit(job.out, kept, signatures, digests)
        stats = {"source": job.source, "key": job.key, **counts, "drops": {r: dict(c) for r, c in drops.items()},
                 "samples": samples, "skips": skips.to_dict(), "pii": dict(pii),
                 "seconds": round(time.perf_counter() - started, 3)}
        _atomic_text(stats_path, json.dumps(stats))
        return {**stats, "cached": False}

    def _apply(self, doc: Document, counts: Counter) -> Document | tuple[str, Document]:
        """Run the steps in order; count documents and bytes into and out of each."""
        for step in self.steps:
            if step.kinds is not None and doc.kind not in step.kinds:
                continue
            counts[f"{step.name}:docs_in"] += 1
            counts[f"{step.name}:bytes_in"] += len(doc.text.encode())
            result = step(doc)
            if isinstance(result, Drop):
                return f"{step.name}/{result.reason}", doc
            doc = result
            counts[f"{step.name}:docs_out"] += 1
            counts[f"{step.name}:bytes_out"] += len(doc.text.encode())
        return doc


def read_unit(out: Path) -> list[Document]:
    """A finished unit's kept documents (its digest and signature arrays are read by dedup_disk)."""
    with gzip.open(out.with_suffix(".jsonl.gz"), "rt", encoding="utf-8") as f:
        return [Document.from_dict(json.loads(line)) for line in f]


def _write_unit(out: Path, docs: list[Document], signatures: list, digests: list) -> None:
    """Documents and arrays first, each renamed into place; the stats JSON written after them marks the unit done."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.jsonl.gz")
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
        for d in docs:
            f.write(json.dumps(d.to_dict(), ensure_ascii=False) + "\n")
    os.replace(tmp, out.with_suffix(".jsonl.gz"))
    arrays = {".exact.npy": np.stack(digests) if digests else np.zeros((0, 16), np.uint8)}
    if signatures:
        arrays[".sig.npy"] = np.stack(signatures)
    for suffix, array in arrays.items():
        tmp_arr = out.with_name(f".{out.name}.tmp-{os.getpid()}.npy")
        np.save(tmp_arr, array)
        os.replace(tmp_arr, out.with_suffix(suffix))


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


_WORKER: Worker | None = None


def init_worker(worker: Worker) -> None:
    """Pool initializer: keep the worker state in the process (sent once, not per job)."""
    global _WORKER
    _WORKER = worker


def run_job(job: Job) -> dict[str, Any]:
    return _WORKER.run(job)
