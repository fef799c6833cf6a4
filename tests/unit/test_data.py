"""`lifecycle data` end to end on tiny inputs: report, dedup, decontam, PII, bad input, cache, shards."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from lifecycle.data.shards import open_split
from lifecycle.data.stage import run
from lifecycle.errors import DataError

from conftest import cli, data_cfg, prose


def corpus(tmp_path, n: int = 12, extra: dict | None = None):
    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    for i in range(n):
        (docs / f"doc{i:02d}.txt").write_text(prose(i))
    for name, text in (extra or {}).items():
        (docs / name).write_text(text)
    return docs


def files_cfg(tmp_path, docs, *overrides, run="r"):
    return data_cfg(tmp_path, "source=[files]", f"sources.files.path={docs}", "sources.files.extensions=[.txt]",
                    "val_fraction=0.25", f"cache_dir={tmp_path / 'cache'}", "instruct.from_code=false",
                    "tokenizer.vocab_size=300", *overrides, run=run)


def load_clean(run_dir, split="train"):
    rows = []
    for path in sorted((run_dir / "clean").glob(f"{split}-*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            rows += [json.loads(line) for line in f]
    return rows


def test_planted_duplicates_contamination_and_pii(tmp_path):
    words = prose(3).split()
    words[10], words[100] = "zzyzx", "qqvvq"  # 2 of 220 words edited: a near duplicate
    near = " ".join(words)
    reference = tmp_path / "eval.jsonl"
    reference.write_text(json.dumps({"question": " ".join(prose(7).split()[40:70])}) + "\n")
    docs = corpus(tmp_path, extra={"exact.txt": prose(1).upper().replace(" ", "  "), "near.txt": near,
                                   "pii.txt": prose(20) + " Write to jane.doe@acmemail.org today.",
                                   "short.txt": "too short to keep"})
    before = {p.name: p.read_bytes() for p in docs.iterdir()}
    metrics = run(files_cfg(tmp_path, docs, f"decontam.references=[{reference}]"))
    run_dir = tmp_path / "out" / "data" / "r"
    report = json.loads((run_dir / "report.json").read_text())
    removed = report["removed"]
    assert removed["dedup/exact"]["docs"] == 1 and removed["dedup/near"]["docs"] == 1
    assert removed["decontam/eval_ngram"]["docs"] == 1
    assert removed["gopher/too_few_words"]["docs"] == 1
    assert report["pii_replaced"] == {"email": 1}
    kept = load_clean(run_dir) + load_clean(run_dir, "val")
    texts = " ".join(r["text"] for r in kept)
    assert "jane.doe@acmemail.org" not in texts and "<EMAIL>" in texts
    assert metrics["data/docs_kept"] == 16 - 4 == len(kept)
    assert {p.name: p.read_bytes() for p in docs.iterdir()} == before  # inputs never modified
    assert report["steps"]["clean"]["docs_in"] == 16
    profile = json.loads((run_dir / "profile.json").read_text())
    assert profile["documents"] == metrics["data/train_docs"] and sum(profile["token_frequencies"]) > 0


def test_bad_jsonl_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "docs" / "a.jsonl"
    path.parent.mkdir()
    good = [json.dumps({"text": prose(i)}) for i in range(6)]
    lines = [good[0], "{not json", good[1], json.dumps({"body": "x"}), good[2], json.dumps({"text": ""})]
    path.write_bytes(("\n".join(lines + good[3:]) + "\n").encode() + b"\xff\xfe broken\n")
    run(data_cfg(tmp_path, "source=[jsonl]", f"sources.jsonl.path={path}", "val_fraction=0.5",
                 f"cache_dir={tmp_path / 'cache'}", "instruct.from_code=false", "tokenizer.vocab_size=300"))
    report = json.loads((tmp_path / "out" / "data" / "r" / "report.json").read_text())
    skips = report["read_skips"]
    assert skips["malformed_json"]["count"] == 1 and skips["malformed_json"]["first"] == [f"{path}:2"]
    assert skips["missing_text_field"]["count"] == 1 and skips["empty_text"]["count"] == 1
    assert skips["invalid_utf8"]["count"] == 1
    assert report["sources"]["jsonl"]["docs_in"] == 6


def test_rerun_reuses_cached_units_and_resumes(tmp_path):
    docs = corpus(tmp_path)
    first = run(files_cfg(tmp_path, docs, run="a"))
    units = sorted((tmp_path / "cache").rglob("*.json"))
    assert len(units) == 12
    units[0].unlink()  # as if the run had been killed before finishing this unit
    second = run(files_cfg(tmp_path, docs, run="b"))
    report = json.loads((tmp_path / "out" / "data" / "b" / "report.json").read_text())
    assert report["sources"]["files"]["cached_units"] == 11
    a, b = (tmp_path / "out" / "data" / r for r in "ab")
    assert (a / "train.bin").read_bytes() == (b / "train.bin").read_bytes()
    assert first["data/train_tokens"] == second["data/train_tokens"]
    (docs / "doc00.txt").write_text(prose(100))  # changed content -> a new unit, the others reused
    run(files_cfg(tmp_path, docs, run="c"))
    report = json.loads((tmp_path / "out" / "data" / "c" / "report.json").read_text())
    assert report["sources"]["files"]["cached_units"] == 11
    run(files_cfg(tmp_path, docs, "dedup.tokens=words", run="d"))  # other shingles, other signatures: none reused
    report = json.loads((tmp_path / "out" / "data" / "d" / "report.json").read_text())
    assert report["sources"]["files"]["cached_units"] == 0


def test_no_surviving_documents_is_an_error(tmp_path):
    docs = corpus(tmp_path, n=0, extra={"a.txt": "tiny", "b.txt": "   \n"})
    with pytest.raises(DataError, match="no documents survived"):
        run(files_cfg(tmp_path, docs))
    assert not (tmp_path / "out" / "data" / "latest").exists()


def test_missing_source_path_names_it(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        run(files_cfg(tmp_path, tmp_path / "nope"))


def test_default_corpus_run(data_dir):
    """The shared tiny stdlib run: code + docstrings, instruction pairs, shards that decode back."""
    from transformers import AutoTokenizer

    report = json.loads((data_dir / "report.json").read_text())
    assert set(report["sources"]) == {"stdlib"} and report["instruct"]["train"] > 10
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["stage"] == "data" and manifest["inputs"]["stdlib"]["units"]
    tokens, meta = open_split(data_dir, "val")
    tok = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    text = tok.decode(tokens.tolist())
    assert meta["val_tokens"] == len(tokens) > 0
    assert text.count("<|endoftext|>") == meta["documents"]["val"]
    assert tokens.dtype == np.uint16
    record = json.loads((data_dir / "instruct" / "train.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]


def test_truncated_shard_is_refused(data_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    with open(copy / "train.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="truncated"):
        open_split(copy, "train")


def test_not_a_data_run(tmp_path):
    with pytest.raises(DataError, match="Run `lifecycle data` first"):
        open_split(tmp_path, "train")


def test_reusing_an_existing_tokenizer(data_dir, tmp_path):
    docs = corpus(tmp_path)
    metrics = run(files_cfg(tmp_path, docs, "tokenizer=hf_pretrained", f"tokenizer.name_or_path={data_dir / 'tokenizer'}"))
    assert metrics["data/vocab_size"] == json.loads((data_dir / "meta.json").read_text())["vocab_size"]


def test_multirun_from_the_cli(tmp_path):
    out = cli("lifecycle.data", "-m", f"paths.output_root={tmp_path}", "logger=none", "max_bytes=100000",
              "instruct.from_code=false", "tokenizer.vocab_size=300,400", timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    metas = sorted(tmp_path.glob("data/multirun/*/*/meta.json"))
    assert [json.loads(m.read_text())["vocab_size"] for m in metas] == [300, 400]
    assert (tmp_path / "data" / "latest").resolve() == metas[-1].parent.resolve()
    report = json.loads((metas[-1].parent / "report.json").read_text())
    assert report["sources"]["stdlib"]["cached_units"] == report["sources"]["stdlib"]["units"]  # second job reused


def test_partitions_fill_a_shared_cache_for_many_machines(tmp_path):
    docs = corpus(tmp_path)
    partial = run(files_cfg(tmp_path, docs, "partition.count=3", "partition.index=1", "partition.only_units=true",
                            run="p1"))
    assert partial["data/docs_in"] == 4 and not (tmp_path / "out" / "data" / "p1" / "manifest.json").exists()
    with pytest.raises(DataError, match="8 of 12 units are not processed yet"):
        run(files_cfg(tmp_path, docs, "partition.count=3", "partition.index=1", run="p1b"))
    for i in (0, 2):
        run(files_cfg(tmp_path, docs, "partition.count=3", f"partition.index={i}", "partition.only_units=true",
                      run=f"p{i}"))
    run(files_cfg(tmp_path, docs, run="final"))
    report = json.loads((tmp_path / "out" / "data" / "final" / "report.json").read_text())
    assert report["sources"]["files"]["cached_units"] == 12


def test_near_dedup_can_be_turned_off(tmp_path):
    words = prose(3).split()
    words[10] = "zzyzx"
    docs = corpus(tmp_path, extra={"near.txt": " ".join(words), "exact.txt": prose(1)})
    run(files_cfg(tmp_path, docs, "dedup=none"))
    removed = json.loads((tmp_path / "out" / "data" / "r" / "report.json").read_text())["removed"]
    assert removed["dedup/exact"]["docs"] == 1 and "dedup/near" not in removed
