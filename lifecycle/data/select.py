"""The global pass over processed units: exact and near dedup, decontamination, the train/val split."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from lifecycle.data.corpus_writer import ShardWriter
from lifecycle.data.dedup_disk import EXACT, NEAR, duplicate_flags
from lifecycle.data.document import Document, is_validation
from lifecycle.data.process import read_unit
from lifecycle.data.progress import progress


def select(units: list[Path], exact: bool, near, decontam, val_fraction: float, out_dir: Path, work_dir: Path,
           on_doc=None) -> dict:
    """Flag duplicates on disk (dedup_disk), then stream the units in order dropping them; write train/val shards."""
    flags, _ = duplicate_flags(units, work_dir, exact=exact, near=near)
    writers = {s: ShardWriter(out_dir, s) for s in ("train", "val")}
    removed: Counter[str] = Counter()
    removed_bytes: Counter[str] = Counter()
    index = 0  # the document's global index in flags (units in order, documents in unit order)
    for out in progress(units, len(units), "dedup", _kept_size):
        for doc in read_unit(out):  # streamed: one document in memory at a time
            reason = _duplicate_or_contaminated(doc, int(flags[index]), decontam)
            index += 1
            if reason:
                removed[reason] += 1
                removed_bytes[reason] += len(doc.text.encode())
                continue
            split = "val" if is_validation(doc.id, val_fraction) else "train"
            writers[split].write(doc)
            if on_doc is not None:
                on_doc(doc, split)
    for w in writers.values():
        w.close()
    return {"paths": {s: w.paths for s, w in writers.items()}, "docs": {s: w.docs for s, w in writers.items()},
            "removed": {r: {"docs": n, "bytes": removed_bytes[r]} for r, n in sorted(removed.items())}}


def _kept_size(out: Path) -> tuple[int, int]:
    stats = json.loads(out.with_suffix(".json").read_text())
    return stats.get("docs_out", 0), stats.get("bytes_out", 0)


def _duplicate_or_contaminated(doc: Document, flag: int, decontam) -> str | None:
    if flag == EXACT:
        return "dedup/exact"
    if flag == NEAR:
        return "dedup/near"
    if decontam is not None and decontam.contaminated(doc.text):
        return "decontam/eval_ngram"
    return None
