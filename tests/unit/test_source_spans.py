"""Big input files split into units: line-aligned byte ranges of plain JSONL, groups of Parquet row groups."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lifecycle.data.document import Skips
from lifecycle.data.sources import JsonLines
from lifecycle.data.spans import file_sha256, unit_bytes, unit_span

MB = 2**20


def read_units(source: JsonLines) -> tuple[list[str], list[tuple[str, str]], dict]:
    """(unit keys, (id, text) of every document in unit order, the skips as a dict)."""
    skips, docs = Skips(), []
    keys = [key for key, _ in source.units()]
    for key in keys:
        docs += [(d.id, d.text) for d in source.read(key, skips)]
    return keys, docs, skips.to_dict()


@pytest.fixture
def jsonl(tmp_path) -> Path:
    """200 records of 20-400 bytes with bad lines among them and no newline after the last one."""
    rows = [json.dumps({"text": f"record {i} " + "x" * (i * 37 % 400)}).encode() for i in range(200)]
    rows[57], rows[140], rows[141] = b"{not json", b"", b'{"text": "caf\xe9"}'
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\n".join(rows))
    return path


@pytest.mark.parametrize("unit_kb", [0.05, 1, 3.7, 10])
def test_ranges_give_the_whole_file_documents_ids_and_skips(jsonl, unit_kb):
    whole = JsonLines("j", str(jsonl.parent), "text", "prose", None, unit_mb=1)
    split = JsonLines("j", str(jsonl.parent), "text", "prose", None, unit_mb=unit_kb * 1024 / MB)
    (whole_key,), whole_docs, whole_skips = read_units(whole)
    keys, docs, skips = read_units(split)
    assert whole_key == str(jsonl) and len(keys) > 1
    assert docs == whole_docs and skips == whole_skips
    assert skips["malformed_json"]["first"] == [f"{jsonl}:58"]  # absolute line, the file's path (not the key)
    assert skips["invalid_utf8"]["first"] == [f"{jsonl}:142"] and docs[-1][0] == "j:big.jsonl:200"
    data, spans = jsonl.read_bytes(), [unit_span(k) for k in keys]
    assert [s[1] for s in spans[1:]] == [s[2] for s in spans[:-1]] and spans[-1][2] == len(data)  # contiguous
    for path, start, end, first in spans:
        assert path == str(jsonl) and (start == 0 or data[start - 1:start] == b"\n")  # each starts a line
        assert first == data[:start].count(b"\n") + 1 and end - start >= min(int(unit_kb * 1024), len(data) - start)
    assert sum(map(unit_bytes, keys)) == len(data)


def test_range_fingerprints_follow_the_file_and_the_range(jsonl):
    source = JsonLines("j", str(jsonl), "text", "prose", None, unit_mb=2 / 1024)
    units = source.units()
    assert len({fp for _, fp in units}) == len(units) > 1 and units == source.units()  # stable: cached per range
    jsonl.write_bytes(jsonl.read_bytes().replace(b"record 199", b"record 1999"))  # the last range changes
    assert all(old != new for (_, old), (_, new) in zip(units, source.units()))


def test_a_line_longer_than_the_unit_and_a_final_newline(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in ["a" * 5000, "b", "c" * 3000]))
    keys, docs, _ = read_units(JsonLines("j", str(path), "text", "prose", None, unit_mb=1000 / MB))
    assert [d[0] for d in docs] == [f"j:a.jsonl:{n}" for n in range(1, 4)]
    assert [unit_span(k)[1:] for k in keys] == [(0, 5013, 1), (5013, path.stat().st_size, 2)]  # no empty 3rd


def test_compressed_files_stay_one_unit(tmp_path):
    text = b"".join(json.dumps({"text": f"row {i} " + "y" * 300}).encode() + b"\n" for i in range(100))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(text))
    source = JsonLines("j", str(tmp_path), "text", "prose", None, unit_mb=1000 / MB)
    assert source.units() == [(str(tmp_path / "a.jsonl.gz"), file_sha256(tmp_path / "a.jsonl.gz"))]


def test_parquet_row_groups_make_units_with_file_row_numbers(tmp_path):
    table = pa.table({"text": [f"row {i} " + "z" * (i % 90) for i in range(1000)], "n": list(range(1000))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=100, compression="none")
    whole = JsonLines("p", str(tmp_path), "text", "prose", None)
    keys, docs, _ = read_units(JsonLines("p", str(tmp_path), "text", "prose", None, unit_mb=8000 / MB))
    assert read_units(whole)[1] == docs and docs[999] == ("p:a.parquet:999", table["text"][999].as_py())
    assert 2 < len(keys) < 10 and [unit_span(k)[3] for k in keys] == [unit_span(k)[1] * 100 for k in keys]
    assert sum(map(unit_bytes, keys)) <= (tmp_path / "a.parquet").stat().st_size
