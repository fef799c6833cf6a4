"""`lifecycle data` on one JSONL file split into byte ranges: the same corpus as unsplit, absolute skip locations,
every range reused from the cache on a re-run."""
from __future__ import annotations

import gzip
import json

import pytest

from lifecycle.data.stage import run

from conftest import data_cfg, prose

pytestmark = pytest.mark.integration
SAME = ("sources", "steps", "removed", "removed_samples", "read_skips", "pii_replaced", "selection", "tokens",
        "instruct")  # every report section but the per-unit counts and the timings


def clean_rows(run_dir) -> dict[str, list[dict]]:
    out = {}
    for split in ("train", "val"):
        out[split] = []
        for path in sorted((run_dir / "clean").glob(f"{split}-*.jsonl.gz")):
            with gzip.open(path, "rt") as f:
                out[split] += [json.loads(line) for line in f]
    return out


def test_one_file_in_ranges_gives_the_unsplit_corpus_and_is_cached(tmp_path):
    lines = [json.dumps({"text": prose(i), "n": i}) for i in range(60)]
    words = prose(3).split()
    words[10], words[100] = "zzyzx", "qqvvq"
    lines[44] = "{not json"                                    # a bad line in a later range: line 45
    lines[49] = json.dumps({"text": prose(3).upper()})         # an exact duplicate of line 4, in another range
    lines[54] = json.dumps({"text": " ".join(words)})          # a near duplicate of line 4
    lines[57] = json.dumps({"text": "too short to keep"})
    path = tmp_path / "docs" / "one.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n")

    def stage(unit_mb: float, name: str) -> tuple[dict, dict]:
        metrics = run(data_cfg(tmp_path, "source=[jsonl]", f"sources.jsonl.path={path}",
                               f"sources.jsonl.unit_mb={unit_mb}", "workers=2", "val_fraction=0.25",
                               f"cache_dir={tmp_path / 'cache'}", "tokenizer.vocab_size=300", run=name))
        return metrics, json.loads((tmp_path / "out" / "data" / name / "report.json").read_text())

    whole, whole_report = stage(64, "whole")
    split, split_report = stage(0.01, "split")
    units = split_report["sources"]["jsonl"].pop("units")
    assert whole_report["sources"]["jsonl"].pop("units") == 1 and units >= 8  # ~90 KB in ranges of >= 10 KB
    for report in (whole_report, split_report):
        report["sources"]["jsonl"].pop("cached_units")
    assert {k: split_report[k] for k in SAME} == {k: whole_report[k] for k in SAME}
    assert split_report["read_skips"]["malformed_json"]["first"] == [f"{path}:45"]
    assert {k: split_report["removed"][k]["docs"] for k in ("dedup/exact", "dedup/near")} == {"dedup/exact": 1,
                                                                                             "dedup/near": 1}
    rows = clean_rows(tmp_path / "out" / "data" / "split")
    assert rows == clean_rows(tmp_path / "out" / "data" / "whole")
    assert sorted(r["id"] for s in rows.values() for r in s) == sorted(
        f"jsonl:one.jsonl:{n}" for n in range(1, 61) if n not in (45, 50, 55, 58))
    timing = {"data/seconds", "data/process_mb_per_s"}
    assert {k: v for k, v in split.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}
    for name in ("whole", "split"):
        assert (tmp_path / "out" / "data" / name / "train.bin").read_bytes() == (
            tmp_path / "out" / "data" / "whole" / "train.bin").read_bytes()

    stage(0.01, "again")
    again = json.loads((tmp_path / "out" / "data" / "again" / "report.json").read_text())["sources"]["jsonl"]
    assert again["units"] == again["cached_units"] == units
