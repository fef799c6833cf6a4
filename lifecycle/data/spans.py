"""Work units smaller than a file: a big plain .jsonl's line-aligned byte ranges, a big Parquet file's row groups.

Found in the pass that hashes the file, fingerprinted by the file's sha256 and the span, so finished spans are
reused from the cache and workers share one big file.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pyarrow
import pyarrow.parquet as pq

# A unit that is part of a file: "<path>:bytes=START-END:line=FIRST" (a plain .jsonl's line-aligned byte range) or
# "<path>:row_groups=START-END:row=FIRST" (a Parquet file's row groups); END is exclusive, FIRST the range's first
# line (1-based) or row (0-based) number in the whole file, so ids and skip locations stay those of the whole file.
SPAN = re.compile(r"(?P<path>.+):(?P<what>bytes|row_groups)=(?P<start>\d+)-(?P<end>\d+):(?:line|row)=(?P<first>\d+)")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_units(path: Path, span_bytes: int) -> list[tuple[str, str]]:
    """(key, fingerprint) of a file's units: the file, or (a plain .jsonl or .parquet file over span_bytes) its
    spans (see SPAN), each fingerprinted by the file's sha256 and the span."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".parquet")) and path.stat().st_size > span_bytes:
        sha, spans = sha256_and_line_spans(path, span_bytes) if name.endswith(".jsonl") \
            else (file_sha256(path), row_group_spans(path, span_bytes))
    else:
        sha, spans = file_sha256(path), []
    if len(spans) <= 1:
        return [(str(path), sha)]
    return [(f"{path}:{span}", hashlib.sha256(f"{sha}:{span}".encode()).hexdigest()) for span in spans]


def sha256_and_line_spans(path: Path, span_bytes: int) -> tuple[str, list[str]]:
    """The file's sha256 and its line-aligned byte ranges of at least span_bytes, found in the pass that hashes it."""
    h, starts = hashlib.sha256(), [(0, 1)]  # (byte, line number) where each range starts
    pos, newlines = 0, 0                    # the chunk's offset in the file; newlines before it
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            counted, before = 0, newlines
            # the first newline at or after start + span_bytes - 1 ends the range: the next line starts one later
            while (cut := starts[-1][0] + span_bytes - 1 - pos) < len(chunk):
                nl = chunk.find(b"\n", max(cut, 0))
                if nl < 0:
                    break
                before += chunk.count(b"\n", counted, nl + 1)
                counted = nl + 1
                starts.append((pos + nl + 1, before + 1))
            newlines += chunk.count(b"\n")
            pos += len(chunk)
    if len(starts) > 1 and starts[-1][0] == pos:  # the file's last newline ended a range: nothing after it
        starts.pop()
    ends = [s for s, _ in starts[1:]] + [pos]
    return h.hexdigest(), [f"bytes={s}-{e}:line={n}" for (s, n), e in zip(starts, ends)]


def row_group_spans(path: Path, span_bytes: int) -> list[str]:
    """A Parquet file's row groups gathered into runs of at least span_bytes (compressed); [] if unreadable."""
    try:
        meta = pq.ParquetFile(path).metadata
    except (pyarrow.ArrowException, OSError):
        return []  # read() counts it
    spans, start, first, row, size = [], 0, 0, 0, 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        size += sum(group.column(c).total_compressed_size for c in range(group.num_columns))
        row += group.num_rows
        if size >= span_bytes or g == meta.num_row_groups - 1:
            spans.append(f"row_groups={start}-{g + 1}:row={first}")
            start, first, size = g + 1, row, 0
    return spans


def unit_span(key: str) -> tuple[str, int, int | None, int | None]:
    """(path, start, end, first line or row) of a span key (SPAN); (key, 0, None, None) for a whole file."""
    span = SPAN.fullmatch(key)
    if span is None:
        return key, 0, None, None
    return span["path"], int(span["start"]), int(span["end"]), int(span["first"])


def unit_bytes(key: str) -> int:
    """The input bytes a unit covers (for max_bytes): its byte range, its row groups (compressed), its file, or 0."""
    path, start, end, _ = unit_span(key)
    if end is None:
        return Path(key).stat().st_size if Path(key).is_file() else 0
    if not path.endswith(".parquet"):
        return end - start
    meta = pq.ParquetFile(path).metadata
    return sum(meta.row_group(g).column(c).total_compressed_size for g in range(start, end)
               for c in range(meta.num_columns))
