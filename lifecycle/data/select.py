"""The global pass over processed units: exact and near dedup, decontamination, the train/val split."""
from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path

from lifecycle.data.corpus_writer import ShardWriter
from lifecycle.data.document import Document
from lifecycle.data.process import read_unit
from lifecycle.data.progress import progress


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Held-out by a hash of the id: stable across runs and corpus growth."""
    return zlib.crc32(doc_id.encode()) % 10_000 < val_fraction * 10_000


def select(units: list[Path], exact, near, decontam, val_fraction: float, out_dir: Path, on_doc=None) -> dict:
    """Stream the units in order, keep the first of each duplicate group, write train/val shards."""
    writers = {s: ShardWriter(out_dir, s) for s in ("train", "val")}
    removed: Counter[str] = Counter()
    removed_bytes: Counter[str] = Counter()
    for out in progress(units, len(units), "dedup", _kept_size):
        docs, digests, signatures = read_unit(out)
        for i, doc in enumerate(docs):
            reason = _duplicate_or_contaminated(doc, i, digests, signatures, exact, near, decontam)
            if reason:
                removed[reason] += 1
                removed_bytes[reason] += len(doc.text.encode())
                continue
            writers["val" if is_validation(doc.id, val_fraction) else "train"].write(doc)
            if on_doc is not None:
                on_doc(doc)
    for w in writers.values():
        w.close()
    return {"paths": {s: w.paths for s, w in writers.items()}, "docs": {s: w.docs for s, w in writers.items()},
            "removed": {r: {"docs": n, "bytes": removed_bytes[r]} for r, n in sorted(removed.items())}}


def _kept_size(out: Path) -> tuple[int, int]:
    stats = json.loads(out.with_suffix(".json").read_text())
    return stats.get("docs_out", 0), stats.get("bytes_out", 0)


def _duplicate_or_contaminated(doc: Document, i: int, digests, signatures, exact, near, decontam) -> str | None:
    if exact is not None and exact.seen_digest(doc.id, digests[i].tobytes()) is not None:
        return "dedup/exact"
    if near is not None and signatures is not None and near.seen(doc.id, signatures[i]) is not None:
        return "dedup/near"
    if decontam is not None and decontam.contaminated(doc.text):
        return "decontam/eval_ngram"
    return None
