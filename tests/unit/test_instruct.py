"""Instruction data: input forms, reason codes, JSONL reading and writing, the split, and records from Python code."""
from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

import pytest

from lifecycle.data.document import Document, Skips
from lifecycle.data.instruct import (CODE_INSTRUCTION, CodeCollector, from_python_source, normalize, read_jsonl,
                                     split, write_jsonl)

Q, A = {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}
SYS = {"role": "system", "content": "Be brief."}

MODULE = '''import functools


def double(x):
    """Return x doubled."""
    y = x * 2
    return y


def short(x):
    """Too short."""
    return x


def undocumented(x):
    y = x
    z = y
    return z


def outer():
    """Has a nested function."""
    def inner():
        """Nested: skipped."""
        a = 1
        return a
    return inner


class Box:
    """A box."""

    @functools.cache
    def area(self, w,
             h):
        """Area of
        the box."""
        text = """a
b"""
        return w * h


def inline(): "doc on the def line"; return 1
'''


@pytest.mark.parametrize("record, messages", [
    ({"prompt": Q["content"], "response": "4"}, [Q, A]),
    ({"prompt": Q["content"], "completion": "4"}, [Q, A]),
    ({"instruction": "Add.", "input": "2+2", "output": "4"},
     [{"role": "user", "content": "Add.\n\n2+2"}, A]),
    ({"instruction": Q["content"], "input": "", "output": "4"}, [Q, A]),
    ({"instruction": Q["content"], "output": "4"}, [Q, A]),
    ({"messages": [SYS, Q, A, Q, A]}, [SYS, Q, A, Q, A]),
    ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": Q["content"]},
                        {"from": "gpt", "value": "4"}]}, [SYS, Q, A]),
])
def test_each_form_normalises_to_a_chat(record, messages):
    out = normalize({**record, "id": 7, "source": "mine"})
    assert out == {"messages": messages, "source": "mine", "id": "7"}
    assert normalize(out) == out


@pytest.mark.parametrize("record, reason", [
    ({"question": "q", "answer": "a"}, "unknown_format"),
    ({"messages": "hi"}, "unknown_format"),
    ({"messages": [Q, {"text": "4"}]}, "unknown_format"),
    ({"prompt": "", "response": "4"}, "empty_prompt"),
    ({"prompt": " \n", "response": "4"}, "empty_prompt"),
    ({"messages": []}, "empty_prompt"),
    ({"prompt": "q"}, "empty_response"),
    ({"instruction": "q", "input": "x", "output": ""}, "empty_response"),
    ({"messages": [{"role": "bot", "content": "hi"}, A]}, "bad_role"),
    ({"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "4"}]}, "bad_role"),
    ({"conversations": [{"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "4"}]}, "bad_role"),
    ({"messages": [{"role": {"x": 1}, "content": "hi"}, A]}, "bad_role"),
    ({"messages": [Q, Q, A]}, "not_alternating"),
    ({"messages": [SYS, A]}, "not_alternating"),
    ({"messages": [Q, SYS, A]}, "not_alternating"),
    ({"messages": [Q, A, Q]}, "last_not_assistant"),
    ({"prompt": 3, "response": "4"}, "content_not_a_string"),
    ({"prompt": "q", "response": ["4"]}, "content_not_a_string"),
    ({"instruction": "q", "input": 5, "output": "4"}, "content_not_a_string"),
])
def test_invalid_records_name_their_reason(record, reason):
    with pytest.raises(ValueError) as e:
        normalize(record)
    assert str(e.value) == reason


def test_read_jsonl_skips_bad_lines_and_keeps_the_rest(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join([json.dumps({"prompt": "q1", "response": "r1"}), '{"prompt": "q2", "resp',
                               "[1, 2]", json.dumps({"prompt": "q3"}), "",
                               json.dumps({"prompt": "q4", "response": "r4", "id": "x"})]) + "\n")
    skips = Skips()
    records = list(read_jsonl(path, skips))
    assert [r["messages"][0]["content"] for r in records] == ["q1", "q4"]
    assert [(r["id"], r["source"]) for r in records] == [("a.jsonl:1", "a.jsonl"), ("x", "a.jsonl")]
    assert skips.to_dict() == {"malformed_json": {"count": 1, "first": [f"{path}:2"]},
                               "not_an_object": {"count": 1, "first": [f"{path}:3"]},
                               "empty_response": {"count": 1, "first": [f"{path}:4"]}}


def test_write_then_read_gzip_round_trips(tmp_path):
    records = [normalize({"prompt": f"q{i}", "response": "ü", "id": str(i), "source": "s"}) for i in range(3)]
    path = tmp_path / "sub" / "chat.jsonl.gz"
    assert write_jsonl(path, records) == 3
    assert list(read_jsonl(path, Skips())) == records
    assert sorted(p.name for p in path.parent.iterdir()) == ["chat.jsonl.gz"]


def test_write_jsonl_failure_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [normalize({"prompt": "q", "response": "r", "id": "1"})])
    before = path.read_text()

    def failing():
        yield normalize({"prompt": "q2", "response": "r2", "id": "2"})
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        write_jsonl(path, failing())
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["chat.jsonl"]


def test_split_is_stable_and_by_id():
    records = [{"id": f"doc{i}::f", "messages": []} for i in range(400)]
    train, val = split(records, 0.2)
    assert (train, val) == split(list(records), 0.2)
    assert 40 < len(val) < 120 and len(train) + len(val) == 400
    # A subset splits the same way: adding data never moves a record between train and val.
    _, val_half = split(records[::2], 0.2)
    assert val_half == [r for r in val if r in records[::2]]
    assert split(records, 0.0) == (records, [])


def test_from_python_source_builds_signature_to_body_records():
    records = from_python_source(MODULE, "mod.py", min_body_lines=2, max_chars=1000)
    assert [r["id"] for r in records] == ["mod.py::double", "mod.py::outer", "mod.py::Box.area"]
    double = records[0]
    assert double["messages"] == [
        {"role": "user", "content": CODE_INSTRUCTION + 'def double(x):\n    """Return x doubled."""\n'},
        {"role": "assistant", "content": "    y = x * 2\n    return y\n"}]
    area = records[2]["messages"]
    assert area[0]["content"].startswith(CODE_INSTRUCTION + "def area(self, w,\n         h):\n")  # no decorator
    assert area[1]["content"] == '    text = """a\nb"""\n    return w * h\n'  # the string's value kept
    for r in records:
        assert normalize(r) == r
        fn = ast.parse(r["messages"][0]["content"].removeprefix(CODE_INSTRUCTION) + r["messages"][1]["content"])
        assert isinstance(fn.body[0], ast.FunctionDef) and ast.get_docstring(fn.body[0])


def test_from_python_source_limits_and_unparsable_files():
    assert [r["id"] for r in from_python_source(MODULE, "m", min_body_lines=3, max_chars=1000)] == ["m::outer",
                                                                                                  "m::Box.area"]
    double = from_python_source(MODULE, "m", min_body_lines=2, max_chars=1000)[0]["messages"]
    size = len(double[0]["content"]) + len(double[1]["content"])
    assert [r["id"] for r in from_python_source(MODULE, "m", min_body_lines=2, max_chars=size)] == ["m::double"]
    assert from_python_source(MODULE, "m", min_body_lines=2, max_chars=size - 1) == []
    assert from_python_source("def f(:\n", "m", min_body_lines=1, max_chars=1000) == []


@pytest.mark.parametrize("name, at_least", [("json/decoder.py", 3), ("textwrap.py", 5)])
def test_from_python_source_on_the_stdlib(name, at_least):
    text = (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8")
    records = from_python_source(text, f"stdlib:{name}", min_body_lines=3, max_chars=4000)
    assert len(records) >= at_least
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert normalize(r) == r and r["source"] == "python_functions"
        assert len(r["messages"][0]["content"]) + len(r["messages"][1]["content"]) <= 4000
        ast.parse(r["messages"][0]["content"].removeprefix(CODE_INSTRUCTION) + r["messages"][1]["content"])


def test_code_collector_streams_records_to_disk_and_appends_the_files_pairs(tmp_path):
    collector = CodeCollector(min_body_lines=2, max_chars=1000, out_dir=tmp_path / "instruct")
    for i in range(3):
        collector(Document(f"m{i}.py", MODULE, "stdlib", "code", "python"), "val" if i == 1 else "train")
    collector(Document("notes.txt", MODULE, "files", "prose"), "train")  # not code: nothing collected
    assert vars(collector).keys() >= {"paths", "counts"} and "records" not in vars(collector)  # no list in memory
    assert collector.counts == {"train": 6, "val": 3}
    more = [normalize({"prompt": "q", "response": "a", "id": "u1", "source": "user"})]
    assert collector.finish("train", tmp_path / "instruct" / "train.jsonl", more) == 7
    assert collector.finish("val", tmp_path / "instruct" / "val.jsonl", []) == 3
    train = list(read_jsonl(tmp_path / "instruct" / "train.jsonl", Skips()))
    functions = ("double", "outer", "Box.area")
    assert [r["id"] for r in train] == [f"m{i}.py::{f}" for i in (0, 2) for f in functions] + ["u1"]
    assert sorted(p.name for p in (tmp_path / "instruct").iterdir()) == ["train.jsonl", "val.jsonl"]  # no temp files
