"""Per-unit processing in worker processes: read -> clean -> filter -> scrub -> MinHash, cached by content hash."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lifecycle.data.dedup import exact_key
from lifecycle.data.document import Document, Drop, Skips

FORMAT = 2  # bump when a unit's files change shape, so old cache entries are not read
SAMPLES_PER_REASON = 3
SAMPLE_CHARS = 400
BUFFER_BYTES = 1 << 20  # digests and signatures buffered before they are appended to the unit's raw files


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
        with UnitWriter(job.out) as writer:
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
                writer.add(result, np.frombuffer(exact_key(result.text), dtype=np.uint8),
                           self.near.signature(result.text) if self.near is not None else None)
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


def read_unit(out: Path) -> Iterator[Document]:
    """A finished unit's kept documents, streamed (its digest and signature arrays are read by dedup_disk)."""
    with gzip.open(out.with_suffix(".jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            yield Document.from_dict(json.loads(line))


class UnitWriter:
    """A unit's files, written as its documents come: the documents gzip-streamed, the digests and MinHash
    signatures appended to raw files through a bounded buffer. Closed without an error, it renames the documents
    into place, then writes .exact.npy and (if any signature came) .sig.npy; the stats JSON the worker writes after
    them marks the unit done. Temporary files are removed either way."""

    def __init__(self, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.docs = gzip.open(self.tmp(".jsonl.gz"), "wt", encoding="utf-8", compresslevel=1)
        self.arrays = {".exact.npy": RawRows(self.tmp(".exact.raw"), 16, np.dtype(np.uint8)),
                       ".sig.npy": RawRows(self.tmp(".sig.raw"))}

    def tmp(self, suffix: str) -> Path:
        return self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}{suffix}")

    def add(self, doc: Document, digest: np.ndarray, signature: np.ndarray | None) -> None:
        self.docs.write(json.dumps(doc.to_dict(), ensure_ascii=False) + "\n")
        self.arrays[".exact.npy"].add(digest)
        if signature is not None:
            self.arrays[".sig.npy"].add(signature)

    def __enter__(self) -> UnitWriter:
        return self

    def __exit__(self, error_type, *_) -> None:
        self.docs.close()
        try:
            if error_type is None:
                os.replace(self.tmp(".jsonl.gz"), self.out.with_suffix(".jsonl.gz"))
                for suffix, rows in self.arrays.items():
                    if rows.width is not None:
                        rows.save(self.tmp(".npy"))
                        os.replace(self.tmp(".npy"), self.out.with_suffix(suffix))
        finally:
            for path in (self.tmp(".jsonl.gz"), self.tmp(".npy"),
                         *(rows.close() for rows in self.arrays.values())):
                path.unlink(missing_ok=True)


class RawRows:
    """Equal-length 1-D rows appended to a raw file through a BUFFER_BYTES buffer; `save` makes it an .npy."""

    def __init__(self, path: Path, width: int | None = None, dtype: np.dtype | None = None) -> None:
        self.path, self.width, self.dtype, self.rows = path, width, dtype, 0
        self._file = open(path, "wb", buffering=BUFFER_BYTES)

    def add(self, row: np.ndarray) -> None:
        self.width, self.dtype = len(row), row.dtype  # the first row's, when not given
        self._file.write(row.tobytes())
        self.rows += 1

    def save(self, path: Path) -> None:
        """An .npy of shape (rows, width): the header, then the raw file copied BUFFER_BYTES at a time."""
        self._file.close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.rows, self.width)}
        with open(path, "wb") as out, open(self.path, "rb") as raw:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(raw, out, BUFFER_BYTES)

    def close(self) -> Path:
        """Close the raw file; its path (the caller removes it)."""
        self._file.close()
        return self.path


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
