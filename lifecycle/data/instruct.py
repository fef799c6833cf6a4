"""Instruction data for fine-tuning: reading, validating and normalising JSONL, and building it from Python source.

Every record becomes one canonical chat, the form the fine-tuning stage reads (it masks all but the assistant
turns out of the loss):

    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "source": str, "id": str}

Accepted input forms: {"prompt", "response"|"completion"}, Alpaca {"instruction", "input"?, "output"}, and
{"messages"|"conversations": [...]} with {"role", "content"} or ShareGPT {"from", "value"} turns.
"""
from __future__ import annotations

import ast
import gzip
import json
import os
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from lifecycle.data.document import Skips, is_validation

ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CODE_INSTRUCTION = "Complete the body of this Python function.\n\n"


def normalize(record: dict[str, Any]) -> dict[str, Any]:
    """The canonical chat for one input record; `ValueError(reason_code)` if it is not valid."""
    if "messages" in record or "conversations" in record:
        turns = record.get("messages", record.get("conversations"))
        if not isinstance(turns, list):
            raise ValueError("unknown_format")
        messages = [_message(turn) for turn in turns]
    elif "prompt" in record:
        response = record.get("response", record.get("completion"))
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": response}]
    elif "instruction" in record:
        messages = [{"role": "user", "content": _alpaca_prompt(record["instruction"], record.get("input"))},
                    {"role": "assistant", "content": record.get("output")}]
    else:
        raise ValueError("unknown_format")
    _validate(messages)
    return {"messages": messages, "source": str(record.get("source", "")), "id": str(record.get("id", ""))}


def _message(turn: Any) -> dict[str, Any]:
    if isinstance(turn, dict) and "role" in turn and "content" in turn:
        return {"role": turn["role"], "content": turn["content"]}
    if isinstance(turn, dict) and "from" in turn and "value" in turn:
        role = turn["from"]
        return {"role": SHAREGPT_ROLES.get(role, role) if isinstance(role, str) else role, "content": turn["value"]}
    raise ValueError("unknown_format")


def _alpaca_prompt(instruction: Any, extra: Any) -> Any:
    extra = "" if extra is None else extra
    if not isinstance(extra, str):
        raise ValueError("content_not_a_string")
    if not extra.strip() or not isinstance(instruction, str) or not instruction.strip():
        return instruction  # validation then names what is wrong with the instruction itself
    return f"{instruction}\n\n{extra}"


def _validate(messages: list[dict[str, Any]]) -> None:
    for m in messages:
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            raise ValueError("bad_role")
        if m["content"] is None or m["content"] == "":
            raise ValueError("empty_response" if m["role"] == "assistant" else "empty_prompt")
        if not isinstance(m["content"], str):
            raise ValueError("content_not_a_string")
        if not m["content"].strip():
            raise ValueError("empty_response" if m["role"] == "assistant" else "empty_prompt")
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise ValueError("empty_prompt")
    if any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(turns)):
        raise ValueError("not_alternating")
    if turns[-1]["role"] != "assistant":
        raise ValueError("last_not_assistant")


def _open(path: Path, mode: str, gz: bool) -> IO[str]:
    if gz:
        return gzip.open(path, mode + "t", encoding="utf-8", errors="replace")
    return open(path, mode, encoding="utf-8", errors="replace")


def read_jsonl(path: Path, skips: Skips) -> Iterator[dict[str, Any]]:
    """Canonical records of a JSONL file (plain or .gz); bad lines are counted in `skips` and reading goes on.

    A record without an id gets "<file name>:<line>", without a source the file name.
    """
    path = Path(path)
    with _open(path, "r", gz=path.suffix == ".gz") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                skips.add("malformed_json", where)
                continue
            if not isinstance(obj, dict):
                skips.add("not_an_object", where)
                continue
            try:
                record = normalize(obj)
            except ValueError as e:
                skips.add(str(e), where)
                continue
            record["id"] = record["id"] or f"{path.name}:{lineno}"
            record["source"] = record["source"] or path.name
            yield record


def from_python_source(text: str, doc_id: str, min_body_lines: int, max_chars: int,
                       source: str = "python_functions") -> list[dict[str, Any]]:
    """Records "signature + docstring -> body" for the documented functions and methods of one Python file.

    The user turn is CODE_INSTRUCTION followed by the `def` header and the docstring, verbatim and shifted so
    that `def` sits in column 0, ending in a newline; the assistant turn is the rest of the body, indented as
    under that header, so the code of the prompt plus the response is a valid top-level function. Functions
    whose body after the docstring has fewer than `min_body_lines` non-blank lines, or whose record is longer
    than `max_chars`, are left out; so are nested functions and files that do not parse.
    """
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines()
    records = []
    for qualname, node in _functions(tree.body, ""):
        pair = _prompt_and_body(lines, node)
        if pair is None:
            continue
        head, body = pair
        prompt = CODE_INSTRUCTION + head
        if sum(1 for ln in body.splitlines() if ln.strip()) < min_body_lines or len(prompt) + len(body) > max_chars:
            continue
        records.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": body}],
                        "source": source, "id": f"{doc_id}::{qualname}"})
    return records


def _functions(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Module-level functions and methods (of classes at any depth, not inside functions), in source order."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node.body, f"{prefix}{node.name}.")


def _prompt_and_body(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, str] | None:
    """(header + docstring, body) shifted left by the `def`'s column, or None where they cannot split cleanly."""
    doc = node.body[0]
    if (len(node.body) < 2 or ast.get_docstring(node, clean=False) is None
            or doc.lineno == node.lineno or node.body[1].lineno <= doc.end_lineno):
        return None  # no docstring or no body, or the docstring shares a line with the `def` or with code
    col = node.col_offset
    shifted = [ln[col:] if not ln[:col].strip() else ln for ln in lines[node.lineno - 1:node.end_lineno]]
    split = doc.end_lineno - node.lineno + 1
    head, body = "\n".join(shifted[:split]) + "\n", "\n".join(shifted[split:]) + "\n"
    try:
        ast.parse(head + body)
    except SyntaxError:
        return None  # e.g. a line continuation in the header that the shift broke
    return head, body


def scrub(records: Iterable[dict[str, Any]], steps: list, skips: Skips) -> list[dict[str, Any]]:
    """Records with every message through the data steps that apply to any kind (cleaning, PII, blocklist) and
    exact duplicates removed; a record one of whose messages a step drops is skipped and counted by reason."""
    from lifecycle.data.document import Document, Drop
    from lifecycle.data.dedup import exact_key

    kept, seen = [], set()
    for r in records:
        messages, dropped = [], None
        for m in r["messages"]:
            doc = Document(r["id"], m["content"], r["source"], "chat")
            for step in (s for s in steps if s.kinds is None):
                doc = step(doc)
                if isinstance(doc, Drop):
                    dropped = f"{step.name}/{doc.reason}"
                    break
            if dropped:
                break
            messages.append({"role": m["role"], "content": doc.text})
        if dropped or any(not m["content"].strip() for m in messages):
            skips.add(dropped or "empty_after_cleaning", r["id"])
            continue
        key = exact_key(json.dumps(messages, ensure_ascii=False))
        if key in seen:
            skips.add("duplicate_pair", r["id"])
            continue
        seen.add(key)
        kept.append({**r, "messages": messages})
    return kept


def split(records: Iterable[dict[str, Any]], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, val) by a hash of the record id: stable across runs and as the set grows."""
    train, val = [], []
    for r in records:
        (val if is_validation(r["id"], val_fraction) else train).append(r)
    return train, val


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records one JSON object a line (gzip for .gz), atomically; the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with _open(tmp, "w", gz=path.suffix == ".gz") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


class CodeCollector:
    """Called on every kept document with its corpus split: collects instruction records from its Python
    functions into the same split, so validation pairs come only from documents held out of pretraining.

    Records stream to one hidden temporary file per split in `out_dir`; `finish` appends more records and renames
    it into place, so memory does not grow with the corpus.
    """

    def __init__(self, min_body_lines: int, max_chars: int, out_dir: Path):
        self.min_body_lines, self.max_chars = min_body_lines, max_chars
        out_dir.mkdir(parents=True, exist_ok=True)
        self.paths = {s: out_dir / f".code-{s}.jsonl.tmp-{os.getpid()}" for s in ("train", "val")}
        self.counts = {s: 0 for s in self.paths}
        self._files = {s: _open(p, "w", gz=False) for s, p in self.paths.items()}

    def __call__(self, doc, split: str) -> None:
        if doc.kind == "code" and doc.language == "python":
            for r in from_python_source(doc.text, doc.id, self.min_body_lines, self.max_chars, source=doc.source):
                self._files[split].write(json.dumps(r, ensure_ascii=False) + "\n")
                self.counts[split] += 1

    def finish(self, split: str, path: Path, more: Iterable[dict[str, Any]]) -> int:
        """Write the split's collected records followed by `more` to `path` (renamed into place); how many."""
        f = self._files[split]
        try:
            for r in more:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                self.counts[split] += 1
            f.close()
            os.replace(self.paths[split], path)
        finally:
            f.close()
            self.paths[split].unlink(missing_ok=True)
        return self.counts[split]
