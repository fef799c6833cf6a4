"""Where documents come from: the stdlib, a directory of files, JSON Lines/Parquet, a Hugging Face dataset.

Each source lists its work units as (key, content fingerprint) and streams one unit's documents, counting
bad input in `Skips` instead of failing. Sources hold only plain attributes: they are pickled to workers.
"""
from __future__ import annotations

import ast
import glob
import gzip
import hashlib
import json
import os
import sysconfig
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterator

import pyarrow
import pyarrow.parquet as pq
import pypdf
import trafilatura
import zstandard

from lifecycle.data.document import Document, Skips
from lifecycle.data.spans import file_sha256, file_units, unit_span
from lifecycle.errors import ConfigError, DataError

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}
CODE_LANGUAGES = {
    ".py": "python", ".js": "javascript", ".ts": "typescript", ".java": "java", ".c": "c", ".h": "c",
    ".cpp": "cpp", ".cc": "cpp", ".hpp": "cpp", ".go": "go", ".rs": "rust", ".rb": "ruby", ".sh": "shell",
    ".sql": "sql", ".kt": "kotlin", ".swift": "swift", ".scala": "scala", ".php": "php", ".lua": "lua",
}
WEB_SUFFIXES = {".html", ".htm"}
ROW_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
CHUNK = 1 << 16                  # bytes read (or compressed bytes fed) at a time
METADATA_MAX_CHARS = 1024        # longer string fields stay out of metadata: it travels with every document


class Stdlib:
    """This Python's standard library source as code, plus (optionally) its docstrings as prose."""

    def __init__(self, name: str, include_docstrings: bool, max_bytes: int | None) -> None:
        self.name, self.include_docstrings, self.max_bytes = name, include_docstrings, max_bytes
        self.root = sysconfig.get_paths()["stdlib"]

    def units(self) -> list[tuple[str, str]]:
        files, total = [], 0
        for path in sorted(walk(Path(self.root), (".py",)), key=str):
            if self.max_bytes is not None and total >= self.max_bytes:
                break
            files.append(path)
            total += path.stat().st_size
        if not files:
            raise DataError(f"source {self.name}: no *.py files under {self.root} (this Python's stdlib); "
                            "use a Python with its stdlib sources installed or another source")
        return [(str(p), file_sha256(p)) for p in files]

    def read(self, key: str, skips: Skips) -> Iterator[Document]:
        text, replaced = decode(Path(key).read_bytes())
        if not text.strip():
            skips.add("empty_text", key)
            return
        doc_id = f"{self.name}:{relative(key, self.root)}"
        yield Document(doc_id, text, self.name, "code", "python", {"replaced_bytes": replaced})
        docstrings = module_docstrings(text) if self.include_docstrings else ""
        if docstrings:
            yield Document(f"{doc_id}#docstrings", docstrings, self.name, "prose", "en")


class Files:
    """A directory (recursive) or glob of files: prose, HTML pages, PDFs and source code, by extension."""

    def __init__(self, name: str, path: str, extensions: list[str], kind: str | None) -> None:
        self.name, self.path, self.kind = name, str(path), kind
        self.extensions = [e if e.startswith(".") else f".{e}" for e in extensions]

    def units(self) -> list[tuple[str, str]]:
        return [(str(p), file_sha256(p)) for p in find_files(self.name, self.path, self.extensions)]

    def read(self, key: str, skips: Skips) -> Iterator[Document]:
        suffix = Path(key).suffix.lower()
        if suffix in WEB_SUFFIXES:
            kind, text, metadata = "web", html_text(key, skips), {}
        elif suffix == ".pdf":
            kind, (text, metadata) = "paper", pdf_text(key, skips)
        else:
            kind = "code" if suffix in CODE_LANGUAGES else "prose"
            text, replaced = decode(Path(key).read_bytes(), key, skips)
            metadata = {"replaced_bytes": replaced}
        if text is None:
            return
        if not text.strip():
            skips.add("empty_text", key)
            return
        doc_id = f"{self.name}:{relative(key, glob_root(self.path))}"
        yield Document(doc_id, text, self.name, self.kind or kind, CODE_LANGUAGES.get(suffix, ""), metadata)


class JsonLines:
    """Records in .jsonl, .jsonl.gz, .jsonl.zst or .parquet files; one document per record.

    A plain .jsonl file larger than `unit_mb` is split into line-aligned byte ranges and a Parquet file into groups
    of row groups of about that size, one unit each, so workers share one big file; compressed JSONL cannot be
    split and stays one unit (streamed, so memory stays bounded either way). `unit_mb=None`: one unit per file.
    """

    def __init__(self, name: str, path: str, text_field: str, kind: str, id_field: str | None,
                 unit_mb: float | None = None) -> None:
        self.name, self.path, self.text_field, self.kind, self.id_field = name, str(path), text_field, kind, id_field
        self.unit_mb = unit_mb

    def units(self) -> list[tuple[str, str]]:
        span_bytes = max(1, int(self.unit_mb * 2**20)) if self.unit_mb else float("inf")  # inf: never split
        return [u for p in find_files(self.name, self.path, list(ROW_SUFFIXES)) for u in file_units(p, span_bytes)]

    def read(self, key: str, skips: Skips) -> Iterator[Document]:
        path, start, end, first = unit_span(key)
        rel = relative(path, glob_root(self.path))
        rows = parquet_rows(path, [self.text_field, self.id_field], skips, start, end, first or 0) \
            if path.endswith(".parquet") else json_rows(path, skips, start, end, first or 1)
        for number, record in rows:
            where = f"{path}:{number}"
            text = record_text(record, self.text_field, where, skips)
            if text is None:
                continue
            doc_id = f"{self.name}:{rel}:{number}"
            if self.id_field is not None:
                if not isinstance(record.get(self.id_field), (str, int)):
                    skips.add("missing_id_field", where)
                    continue
                doc_id = f"{self.name}:{record[self.id_field]}"
            yield Document(doc_id, text, self.name, self.kind, "", scalar_fields(record, self.text_field))


class HFDataset:
    """A `datasets.load_dataset` split (a hub name, or a local directory of data files), in row ranges."""

    def __init__(self, name: str, path: str, split: str, text_field: str, kind: str, config_name: str | None,
                 revision: str | None, rows_per_unit: int) -> None:
        self.name, self.path, self.split, self.text_field, self.kind = name, str(path), split, text_field, kind
        self.config_name, self.revision, self.rows_per_unit = config_name, revision, rows_per_unit
        self._dataset = None  # loaded on first use, in each process

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None}  # workers reopen the (cached) dataset themselves

    def dataset(self):
        """The loaded split, checked for the text column."""
        if self._dataset is None:
            import datasets  # heavy import, only for this source

            try:
                ds = datasets.load_dataset(self.path, name=self.config_name, split=self.split,
                                           revision=self.revision)
            except (OSError, ValueError) as e:  # ConnectionError offline, FileNotFoundError, unknown split
                raise ConfigError(
                    f"source {self.name}: cannot load dataset {self.path!r} (config {self.config_name}, split "
                    f"{self.split!r}): {e}. Fix sources.{self.name}.path/split, point path at a local directory "
                    "of data files, or run once online (HF_HUB_OFFLINE unset) to cache a hub dataset") from e
            if self.text_field not in ds.column_names:
                raise ConfigError(f"source {self.name}: dataset {self.path!r} has no column {self.text_field!r}; "
                                  f"set sources.{self.name}.text_field to one of {ds.column_names}")
            self._dataset = ds
        return self._dataset

    def units(self) -> list[tuple[str, str]]:
        ds = self.dataset()
        if len(ds) == 0:
            raise DataError(f"source {self.name}: split {self.split!r} of {self.path!r} has no rows; "
                            "choose another split or dataset")
        ranges = [(a, min(a + self.rows_per_unit, len(ds)) - 1) for a in range(0, len(ds), self.rows_per_unit)]
        # The dataset fingerprint changes with its data files, so a unit's hash does too.
        return [(f"rows:{a}-{b}", hashlib.sha256(f"{ds._fingerprint}:{a}-{b}".encode()).hexdigest())
                for a, b in ranges]

    def read(self, key: str, skips: Skips) -> Iterator[Document]:
        import datasets  # heavy import, only for this source

        first, last = (int(n) for n in key.removeprefix("rows:").split("-"))
        ds = self.dataset()
        # Scalar columns only: images or audio would be decoded for nothing.
        columns = [c for c, f in ds.features.items() if c == self.text_field or isinstance(f, datasets.Value)]
        for index, record in enumerate(ds.select_columns(columns).select(range(first, last + 1)), start=first):
            text = record_text(record, self.text_field, f"{self.path}:row {index}", skips)
            if text is not None:
                yield Document(f"{self.name}:{index}", text, self.name, self.kind, "",
                               scalar_fields(record, self.text_field))


def walk(root: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    """Files under root ending in one of suffixes, never descending into SKIP_DIRS."""
    for top, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        yield from (Path(top, n) for n in sorted(names) if n.lower().endswith(suffixes))


def glob_root(path: str) -> Path:
    """The directory document ids are relative to: a glob's part before its first wildcard, or the directory."""
    parts = Path(path).expanduser().absolute().parts
    cut = next((i for i, part in enumerate(parts) if is_pattern(part)), None)
    if cut is not None:
        return Path(*parts[:cut])
    return Path(*parts) if Path(*parts).is_dir() else Path(*parts).parent


def is_pattern(path: str) -> bool:
    return any(c in path for c in "*?[")


def find_files(name: str, path: str, suffixes: list[str]) -> list[Path]:
    """The sorted files a directory or glob names with one of suffixes; a DataError saying why if none."""
    expanded = Path(path).expanduser().absolute()
    exts = tuple(s.lower() for s in suffixes)
    if is_pattern(str(expanded)):
        root = glob_root(path)
        found = [p for p in map(Path, glob.glob(str(expanded), recursive=True)) if p.is_file()
                 and p.name.lower().endswith(exts) and not SKIP_DIRS.intersection(p.relative_to(root).parts)]
    elif expanded.is_dir():
        found = list(walk(expanded, exts))
    elif expanded.is_file():
        found = [expanded] if expanded.name.lower().endswith(exts) else []
    else:
        raise DataError(f"source {name}: path {path!r} does not exist; set sources.{name}.path to a directory "
                        "or a glob such as '~/docs/**/*.md'")
    if not found:
        raise DataError(f"source {name}: no files ending in {list(exts)} at {path!r}; set sources.{name}.path "
                        f"to where they are or sources.{name}.extensions to what is there")
    return sorted(found, key=str)


def relative(key: str, root: str | Path) -> str:
    path = Path(key)
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def decode(data: bytes, key: str | None = None, skips: Skips | None = None) -> tuple[str, bool]:
    """(text, whether bytes were replaced): invalid UTF-8 becomes U+FFFD, counted once per file if skips given."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError as e:
        if skips is not None:
            skips.add("invalid_utf8", f"{key}:byte {e.start}")
        return data.decode("utf-8", errors="replace"), True


def module_docstrings(source: str) -> str:
    """The module, class and function docstrings of Python source, blank-line separated; "" if it won't parse."""
    try:
        with warnings.catch_warnings():  # old stdlib files raise SyntaxWarning (invalid escapes) on parse
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: source with null bytes
        return ""
    nodes = [tree, *(n for n in ast.walk(tree)
                     if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
    return "\n\n".join(d for d in map(ast.get_docstring, nodes) if d)


def html_text(key: str, skips: Skips) -> str | None:
    """The main text of an HTML page (trafilatura drops navigation and boilerplate); None if it finds none."""
    text = trafilatura.extract(Path(key).read_bytes(), include_comments=False, include_tables=True)
    if text is None:
        skips.add("html_no_text", key)
    return text


def pdf_text(key: str, skips: Skips) -> tuple[str | None, dict[str, Any]]:
    """(text page by page, {"pages": n}); (None, {}) for a PDF pypdf cannot open or decrypt."""
    try:
        reader = pypdf.PdfReader(key)
        if reader.is_encrypted and not reader.decrypt(""):
            raise pypdf.errors.FileNotDecryptedError("needs a password")
        pages = list(reader.pages)
    except Exception:  # corrupt PDFs raise anything from PdfReadError to KeyError; one must not stop the run
        skips.add("pdf_unreadable", key)
        return None, {}
    texts = []
    for number, page in enumerate(pages, start=1):
        try:
            texts.append(page.extract_text())
        except Exception:  # same reason, one page
            skips.add("pdf_page_unreadable", f"{key}:page {number}")
    return "\n\n".join(texts), {"pages": len(pages)}


def decompressed_chunks(path: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """The bytes of a .jsonl/.jsonl.gz/.jsonl.zst file (of a plain file: bytes [start, end)); EOFError where a
    compressed stream is cut short."""
    with open(path, "rb") as fh:
        if path.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=fh)
            yield from iter(lambda: stream.read1(CHUNK), b"")  # read() would drop what it decoded before a cut
        elif path.endswith(".zst"):
            yield from zstd_chunks(fh)
        elif end is None:
            yield from iter(lambda: fh.read(CHUNK), b"")
        else:
            fh.seek(start)
            while (left := end - fh.tell()) > 0 and (chunk := fh.read(min(CHUNK, left))):
                yield chunk


def zstd_chunks(fh) -> Iterator[bytes]:
    """Decompressed (multi-frame) zstd; python-zstandard's stream_reader ends silently on a cut, so check eof."""
    decompressor = zstandard.ZstdDecompressor()
    frame, mid_frame = decompressor.decompressobj(), False
    while data := fh.read(CHUNK):
        while data:
            yield frame.decompress(data)
            mid_frame = not frame.eof
            data = b"" if mid_frame else frame.unused_data
            frame = frame if mid_frame else decompressor.decompressobj()
    if mid_frame:
        raise EOFError("zstd stream ends inside a frame")


def lines(path: str, skips: Skips, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """The raw lines of a file (or of its bytes [start, end), which start at a line start); a cut or corrupt stream
    is counted at its (decompressed) byte offset in the file and ends it."""
    head, offset = [b""], start  # head: the pieces of the line not yet ended by a newline
    try:
        for chunk in decompressed_chunks(path, start, end):
            first, *rest = chunk.split(b"\n")
            head.append(first)
            if rest:
                for line in [b"".join(head), *rest[:-1]]:
                    offset += len(line) + 1
                    yield line
                head = [rest[-1]]
    except EOFError:
        skips.add("truncated_file", f"{path}:byte {offset + sum(map(len, head))}")
        return
    except (OSError, zlib.error, zstandard.ZstdError):
        skips.add("corrupt_file", f"{path}:byte {offset + sum(map(len, head))}")
        return
    if any(head):
        yield b"".join(head)


def json_rows(path: str, skips: Skips, start: int = 0, end: int | None = None,
              first: int = 1) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per valid line of the file or of its bytes [start, end) whose first line is `first`;
    bad lines are counted and skipped."""
    for number, line in enumerate(lines(path, skips, start, end), start=first):
        value = parse_line(line, f"{path}:{number}", skips)
        if value is not None:
            yield number, value


def parse_line(line: bytes, where: str, skips: Skips) -> Any:
    """A JSON object from one line, or None after counting why not."""
    if not line.strip():
        skips.add("blank_line", where)
        return None
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        skips.add("invalid_utf8", where)
        return None
    except (ValueError, RecursionError):
        skips.add("malformed_json", where)
        return None
    if not isinstance(value, dict):
        skips.add("not_an_object", where)
        return None
    return value


def parquet_rows(path: str, columns: list[str | None], skips: Skips, start: int = 0, end: int | None = None,
                 first: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row index, record) per row of the file or of its row groups [start, end) whose first row is `first`,
    reading only the named columns present in the file."""
    try:
        parquet = pq.ParquetFile(path)
        wanted = [c for c in columns if c is not None and c in parquet.schema_arrow.names]
        groups = range(start, parquet.num_row_groups if end is None else end)
        number = first
        for batch in parquet.iter_batches(columns=wanted, row_groups=groups):
            for record in batch.to_pylist():
                yield number, record
                number += 1
    except (pyarrow.ArrowException, OSError):
        skips.add("parquet_unreadable", path)


def record_text(record: dict[str, Any], field: str, where: str, skips: Skips) -> str | None:
    """The record's text, or None after counting why it has none."""
    if field not in record:
        skips.add("missing_text_field", where)
        return None
    text = record[field]
    if not isinstance(text, str):
        skips.add("text_not_a_string", where)
        return None
    if not text.strip():
        skips.add("empty_text", where)
        return None
    return text


def scalar_fields(record: dict[str, Any], text_field: str) -> dict[str, Any]:
    """The record's other short scalar fields, kept as document metadata."""
    return {k: v for k, v in record.items() if k != text_field and (v is None or isinstance(v, (bool, int, float))
            or isinstance(v, str) and len(v) <= METADATA_MAX_CHARS)}
