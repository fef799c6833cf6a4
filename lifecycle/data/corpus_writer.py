"""The cleaned corpus on disk: rotating JSONL.gz shards per split, streamed back for the tokenizer."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Iterator

from lifecycle.data.document import Document

SHARD_BYTES = 100 * 2**20  # uncompressed text per shard


class ShardWriter:
    """Writes documents to <dir>/<split>-00000.jsonl.gz, starting a new shard every SHARD_BYTES."""

    def __init__(self, directory: Path, split: str):
        self.dir, self.split = Path(directory), split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []
        self._f, self._bytes = None, 0
        self.docs = 0

    def write(self, doc: Document) -> None:
        if self._f is None or self._bytes >= SHARD_BYTES:
            self._rotate()
        line = json.dumps(doc.to_dict(), ensure_ascii=False) + "\n"
        self._f.write(line)
        self._bytes += len(line)
        self.docs += 1

    def _rotate(self) -> None:
        self.close()
        path = self.dir / f"{self.split}-{len(self.paths):05d}.jsonl.gz"
        self._tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self._f, self._bytes = gzip.open(self._tmp, "wt", encoding="utf-8", compresslevel=3), 0
        self.paths.append(path)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            os.replace(self._tmp, self.paths[-1])
            self._f = None


def read_shards(paths: list[Path]) -> Iterator[Document]:
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield Document.from_dict(json.loads(line))
