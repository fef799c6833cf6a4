"""The one document schema every source yields and every data step reads, and the bookkeeping of drops."""
from __future__ import annotations

import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

FIRST_OFFSETS = 5  # how many example locations each skip reason keeps for the report


@dataclass
class Document:
    id: str                 # stable and unique within the corpus, e.g. "stdlib:json/decoder.py" or "web:a.jsonl:17"
    text: str
    source: str             # the configured source name ("stdlib", "web", ...)
    kind: str               # "code" | "prose" | "web" | "paper"
    language: str = ""      # programming language for code ("python"); natural language code otherwise, if known
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Document:
        return cls(**data)


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Held out by a hash of the id: stable across runs and corpus growth (documents and instruction pairs)."""
    return zlib.crc32(doc_id.encode()) % 10_000 < val_fraction * 10_000


@dataclass(frozen=True)
class Drop:
    """A step's verdict that a document goes: `reason` is a short snake_case code, e.g. "too_few_words"."""
    reason: str


class Skips:
    """Bad input skipped while reading (a line, a file), counted by reason with the first few locations."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < FIRST_OFFSETS:
            self.examples[reason].append(where)

    def merge(self, other: Skips) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            room = FIRST_OFFSETS - len(self.examples[reason])
            self.examples[reason].extend(other.examples[reason][:max(0, room)])

    def to_dict(self) -> dict[str, Any]:
        return {r: {"count": n, "first": self.examples[r]} for r, n in sorted(self.counts.items())}
