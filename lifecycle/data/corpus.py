"""Reading a corpus: the embedded default (this Python's standard library) or a user directory/glob."""
from __future__ import annotations

import glob
import hashlib
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lifecycle.errors import DataError

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}


@dataclass
class Document:
    id: str    # path relative to the corpus root
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(source: str, path: str | None, extensions: list[str]) -> tuple[Path, list[Path]]:
    """(root, sorted files) for a corpus config; a clear error if there is nothing to read."""
    exts = {e if e.startswith(".") else f".{e}" for e in extensions}
    if source == "stdlib":
        root = stdlib_root()
        candidates = root.rglob("*")
    else:
        expanded = str(Path(path).expanduser())
        if any(ch in expanded for ch in "*?["):
            root = Path(glob.escape(expanded).split("*")[0]).parent if "*" in expanded else Path(expanded).parent
            candidates = (Path(p) for p in glob.glob(expanded, recursive=True))
        else:
            root = Path(expanded)
            if not root.exists():
                raise DataError(f"corpus.path={path!r} does not exist: point it at a directory or a glob of "
                                "text files, e.g. corpus.path='~/docs/**/*.md'")
            candidates = root.rglob("*") if root.is_dir() else iter([root])
    files = sorted(p for p in candidates if p.is_file() and p.suffix in exts
                   and not SKIP_DIRS.intersection(p.parts))
    if not files:
        raise DataError(f"corpus {path or root}: no files with extensions {sorted(exts)}; "
                        "set corpus.extensions=[.txt,.md] or another corpus.path")
    return root, files


def read_documents(root: Path, files: list[Path], max_bytes: int | None) -> Iterator[Document]:
    """Documents in a stable order; undecodable bytes become U+FFFD (some stdlib files are not UTF-8)."""
    total = 0
    for p in files:
        text = p.read_bytes().decode("utf-8", errors="replace")
        if not text.strip():
            continue
        doc_id = str(p.relative_to(root)) if p.is_relative_to(root) else str(p)
        yield Document(doc_id, text)
        total += len(text.encode())
        if max_bytes is not None and total >= max_bytes:
            return


def is_validation(doc: Document, val_fraction: float) -> bool:
    """Held-out split by a hash of the document id: stable across runs and corpus growth."""
    return zlib.crc32(doc.id.encode()) % 10_000 < val_fraction * 10_000


def corpus_digest(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.id.encode())
        h.update(hashlib.sha256(d.text.encode()).digest())
    return "sha256:" + h.hexdigest()
