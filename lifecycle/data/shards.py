"""Packed token shards: one flat memory-mapped array per split plus meta.json."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from lifecycle.errors import DataError

BATCH_DOCS = 256


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_split(path: Path, docs: Iterable, tokenizer, dtype: np.dtype, profile=None) -> int:
    """Tokenize documents in batches, EOS after each, append to `path` (atomically renamed at the end);
    memory stays bounded by one batch whatever the corpus size."""
    eos = tokenizer.eos_token_id
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n_tokens, batch = 0, []
    with open(tmp, "wb") as f:
        def flush():
            nonlocal n_tokens
            encoded = tokenizer([d.text for d in batch], add_special_tokens=False, verbose=False)["input_ids"]
            for doc, ids in zip(batch, encoded):
                arr = np.asarray([*ids, eos], dtype=dtype)
                arr.tofile(f)
                n_tokens += arr.size
                if profile is not None:
                    profile.add(doc.kind, len(doc.text), arr[:-1].astype(np.int64))
            batch.clear()
        for doc in docs:
            batch.append(doc)
            if len(batch) == BATCH_DOCS:
                flush()
        if batch:
            flush()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n_tokens


def open_split(data_dir: Path, split: str) -> tuple[np.memmap, dict]:
    """The memory-mapped tokens of one split and the shard meta, with clear errors for missing pieces."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{data_dir}: no meta.json; this is not a `lifecycle data` output. Run `lifecycle data` "
                        "first, or set data.dir to a finished data run (outputs/data/<run>)")
    meta = json.loads(meta_path.read_text())
    path = data_dir / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path}: missing; re-run `lifecycle data`")
    dtype = np.dtype(meta["dtype"])
    expected = meta[f"{split}_tokens"] * dtype.itemsize
    if path.stat().st_size != expected:
        raise DataError(f"{path}: {path.stat().st_size} bytes, meta.json says {expected}; the file is truncated "
                        "or from another run. Re-run `lifecycle data`")
    return np.memmap(path, dtype=dtype, mode="r"), meta
