"""Decontamination: drop training documents that share a long word n-gram with evaluation data."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from lifecycle.errors import ConfigError

WORD = re.compile(r"\w+")
TEXT_FIELDS = ("text", "prompt", "response", "question", "answer", "context", "query", "content")


def ngram_hashes(text: str, n: int) -> Iterator[bytes]:
    """8-byte digests of the lower-cased word n-grams of `text`."""
    words = WORD.findall(text.lower())
    for i in range(len(words) - n + 1):
        yield hashlib.blake2b(" ".join(words[i:i + n]).encode(), digest_size=8).digest()


def reference_texts(path: Path) -> Iterator[str]:
    """Texts of an evaluation file: JSONL (string fields above, chat `messages`) or plain text."""
    if path.suffix == ".jsonl":
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield from (record[k] for k in TEXT_FIELDS if isinstance(record.get(k), str))
                yield from (m["content"] for m in record.get("messages", []) if isinstance(m, dict)
                            and isinstance(m.get("content"), str))
    else:
        yield path.read_text(errors="replace")


class Decontaminator:
    """Holds the n-grams of the reference (evaluation) data; `contaminated(text)` says whether text shares one."""

    def __init__(self, references: Iterable[str], ngram: int):
        self.ngram = ngram
        self.grams: set[bytes] = set()
        self.files = []
        for ref in references:
            path = Path(ref).expanduser()
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            if not path.exists():
                raise ConfigError(f"decontam.references: {ref} does not exist; list evaluation data files or "
                                  "directories, or [] to turn decontamination off")
            for f in files:
                self.files.append(str(f))
                for text in reference_texts(f):
                    self.grams.update(ngram_hashes(text, ngram))

    @property
    def active(self) -> bool:
        return bool(self.grams)

    def contaminated(self, text: str) -> bool:
        return self.active and any(g in self.grams for g in ngram_hashes(text, self.ngram))
