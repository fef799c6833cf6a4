"""Corpus reading, the held-out split, packed shards and their errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lifecycle.data.corpus import Document, corpus_files, is_validation, read_documents
from lifecycle.data.shards import open_split
from lifecycle.data.stage import run
from lifecycle.errors import DataError

from conftest import TINY, make_cfg


def test_missing_corpus_path_names_it(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        corpus_files("local", str(tmp_path / "nope"), [".txt"])


def test_corpus_without_matching_files(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00")
    with pytest.raises(DataError, match="no files with extensions"):
        corpus_files("local", str(tmp_path), [".txt"])


def test_empty_corpus_is_an_error(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("   \n")
    cfg = make_cfg("data", tmp_path / "out" / "data" / "r", [*TINY, "corpus=local", f"corpus.path={docs}",
                                                               "corpus.extensions=[.txt]"])
    with pytest.raises(DataError, match="empty"):
        run(cfg)
    assert not (tmp_path / "out" / "data" / "latest").exists()


def test_invalid_utf8_is_replaced_not_fatal(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 ok\n")
    root, files = corpus_files("local", str(tmp_path), [".txt"])
    (doc,) = read_documents(root, files, None)
    assert doc.text == "caf\ufffd ok\n"


def test_glob_corpus(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("x")
    (tmp_path / "b.txt").write_text("y")
    _, files = corpus_files("local", str(tmp_path / "**" / "*.md"), [".md"])
    assert [f.name for f in files] == ["a.md"]


def test_validation_split_is_stable_and_proportional():
    docs = [Document(f"pkg/mod{i}.py", "x") for i in range(5000)]
    chosen = [d.id for d in docs if is_validation(d, 0.1)]
    assert chosen == [d.id for d in docs if is_validation(d, 0.1)]
    assert 400 < len(chosen) < 600


def test_shards_decode_back_to_the_corpus(data_dir):
    from transformers import AutoTokenizer

    tokens, meta = open_split(data_dir, "val")
    tok = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    text = tok.decode(tokens.tolist())
    assert meta["val_tokens"] == len(tokens) > 0
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["stage"] == "data" and manifest["metrics"]["data/val_tokens"] == len(tokens)
    assert text.count("<|endoftext|>") == manifest["metrics"]["data/val_documents"]
    assert "def " in text


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


def test_token_dtype_fits_vocab(data_dir):
    tokens, meta = open_split(data_dir, "train")
    assert tokens.dtype == np.uint16 and int(tokens.max()) < meta["vocab_size"]


def test_reusing_an_existing_tokenizer(data_dir, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"{i}.txt").write_text(f"def f{i}(x):\n    return x + {i}\n" * 50)
    run_dir = tmp_path / "out" / "data" / "r"
    metrics = run(make_cfg("data", run_dir, [*TINY, "corpus=local", f"corpus.path={docs}", "corpus.extensions=[.txt]",
                                             "tokenizer=hf_pretrained",
                                             f"tokenizer.name_or_path={data_dir / 'tokenizer'}"]))
    assert metrics["data/vocab_size"] == json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    assert (tmp_path / "out" / "data" / "latest").resolve() == run_dir.resolve()


def test_multirun_from_the_cli(tmp_path):
    from conftest import cli

    out = cli("lifecycle.data", "-m", f"paths.output_root={tmp_path}", "logger=none", "corpus.max_bytes=100000",
              "tokenizer.vocab_size=300,400", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    metas = sorted(tmp_path.glob("data/multirun/*/*/meta.json"))
    assert [json.loads(m.read_text())["vocab_size"] for m in metas] == [300, 400]
    assert (tmp_path / "data" / "latest").resolve() == metas[-1].parent.resolve()
