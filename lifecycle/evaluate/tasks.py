"""Benchmark tasks through lm-evaluation-harness: lifecycle's own (built from held-out data, offline) and standard ones.

Our tasks are multiple choice, written as lm-eval task YAMLs over local JSONL under <run dir>/tasks/:
  lifecycle_next_line       `context_lines` lines of a held-out Python file -> its true next line among `choices`
                            (distractors: lines of other held-out files, re-indented like the true line)
  lifecycle_docstring_code  a function's signature + docstring (instruct/val.jsonl) -> its true body among others'
Few-shot examples come from the same items (lm-eval leaves out the item being scored).
"""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Callable

import yaml

from lifecycle.data.document import Document, Skips
from lifecycle.data.instruct import CODE_INSTRUCTION, read_jsonl
from lifecycle.errors import ConfigError, DataError

MIN_LINE_CHARS = 8  # shorter lines ("else:", ")") say too little to be worth a question


def next_line_items(data_dir: Path, context_lines: int, choices: int, max_items: int, seed: int) -> list[dict]:
    """Next-line questions over the held-out Python files of a data run (clean/val-*.jsonl.gz)."""
    docs = [doc for doc in _held_out_docs(data_dir) if doc.language == "python"]
    files = [doc.text.splitlines() for doc in docs]
    if not files:
        raise DataError(f"{data_dir}/clean: no held-out Python file to build lifecycle_next_line from; drop the "
                        "task from tasks.names or build the data with Python sources")
    pool = [(f, line.strip()) for f, lines in enumerate(files) for line in lines if len(line.strip()) >= MIN_LINE_CHARS]
    rng = random.Random(seed)
    questions = [(f, j) for f, lines in enumerate(files) for j in range(context_lines, len(lines))
                 if len(lines[j].strip()) >= MIN_LINE_CHARS and any(s.strip() for s in lines[j - context_lines:j])]
    rng.shuffle(questions)
    items = []
    for f, j in questions[:max_items]:
        true = files[f][j]
        others = _distractors(rng, pool, f, true.strip(), choices - 1, single_file=len(files) == 1)
        if others is None:
            continue
        indent = true[:len(true) - len(true.lstrip())]
        options = [true, *(indent + o for o in others)]
        rng.shuffle(options)
        items.append({"id": f"{docs[f].id}:{j + 1}", "context": "\n".join(files[f][j - context_lines:j]) + "\n",
                      "choices": options, "label": options.index(true)})
    return items


def _distractors(rng, pool, f, true: str, k: int, single_file: bool) -> list[str] | None:
    """k distinct lines unlike `true`, from other files (from anywhere when there is only one held-out file)."""
    picked: list[str] = []
    for _ in range(50 * k):
        g, line = pool[rng.randrange(len(pool))]
        if (g != f or single_file) and line != true and line not in picked:
            picked.append(line)
            if len(picked) == k:
                return picked
    return None


def docstring_code_items(data_dir: Path, context_lines: int, choices: int, max_items: int, seed: int) -> list[dict]:
    """Signature + docstring -> body questions from the data run's held-out instruction pairs.

    The whole signature and docstring is the context (`context_lines` is for next-line questions only).
    """
    path = Path(data_dir) / "instruct" / "val.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: missing; point data.dir at a finished `lifecycle data` run (it writes instruct/)")
    pairs = [(r["id"], r["messages"][0]["content"][len(CODE_INSTRUCTION):], r["messages"][1]["content"])
             for r in read_jsonl(path, Skips()) if len(r["messages"]) == 2
             and r["messages"][0]["content"].startswith(CODE_INSTRUCTION)]
    if len(pairs) < choices:
        raise DataError(f"{path}: {len(pairs)} function/body pairs, fewer than tasks.choices={choices}; lower "
                        "tasks.choices or drop lifecycle_docstring_code from tasks.names")
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    items = []
    for i in order[:max_items]:
        item_id, head, body = pairs[i]
        others = [pairs[k][2] for k in rng.sample(range(len(pairs)), min(len(pairs), choices + 2)) if k != i]
        options = [body, *dict.fromkeys(b for b in others if b != body)][:choices]
        rng.shuffle(options)
        items.append({"id": item_id, "context": head, "choices": options, "label": options.index(body)})
    return items


OURS: dict[str, Callable[..., list[dict]]] = {"lifecycle_next_line": next_line_items,
                                              "lifecycle_docstring_code": docstring_code_items}


def _held_out_docs(data_dir: Path):
    paths = sorted((Path(data_dir) / "clean").glob("val-*.jsonl.gz"))
    if not paths:
        raise DataError(f"{data_dir}/clean: no val-*.jsonl.gz; point data.dir at a finished `lifecycle data` run")
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            yield from (Document.from_dict(json.loads(line)) for line in f)


def write_ours(names: list[str], data_dir: Path, out_dir: Path, seed: int, **settings) -> dict[str, list[dict]]:
    """Build our requested tasks' items and write <name>.jsonl + <name>.yaml (an lm-eval task) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    built = {}
    for name in (n for n in names if n in OURS):
        items = OURS[name](data_dir, seed=seed, **settings)
        data = out_dir / f"{name}.jsonl"
        data.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
        (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(_task_yaml(name, data.resolve()), sort_keys=False))
        built[name] = items
    return built


def _task_yaml(name: str, data: Path) -> dict:
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "fewshot_split": "test", "output_type": "multiple_choice",
            "doc_to_text": "context", "doc_to_choice": "choices", "doc_to_target": "label",
            "target_delimiter": "", "fewshot_delimiter": "\n\n",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")],
            "metadata": {"version": 1.0}}


def manager(names: list[str], task_dir: Path):
    """lm-eval's TaskManager over our task YAMLs (and its own tasks when a name is not ours); unknown names fail."""
    from lm_eval.tasks import TaskManager

    standard = [n for n in names if n not in OURS]
    tasks = TaskManager(include_path=str(task_dir), include_defaults=bool(standard))
    unknown = [n for n in names if n not in tasks.all_tasks]
    if unknown:
        raise ConfigError(f"tasks.names: unknown task {', '.join(map(repr, unknown))}; lifecycle's own are "
                          f"{', '.join(OURS)}; standard lm-eval tasks are listed by `lm_eval --tasks list` (their "
                          "data must be available offline)")
    return tasks


def item_texts(names: list[str], tasks) -> dict[str, list[str]]:
    """Each task's items as text (the prompt and the true answer), for the contamination check."""
    from lm_eval.tasks import get_task_dict

    texts = {}
    for name, task in _leaves(get_task_dict(names, tasks)):
        try:
            docs = list(task.eval_docs)
        except Exception as e:  # a standard task whose data is not available offline
            raise DataError(f"task {name}: its data cannot be loaded ({str(e).splitlines()[0]}); make it available "
                            "offline (HF datasets cache) or drop it from tasks.names") from None
        texts[name] = [_doc_text(task, doc) for doc in docs]
    return texts


def _leaves(task_dict: dict):
    """(name, task) of every task in lm-eval's possibly nested {group: {task: Task}} dict."""
    for key, value in task_dict.items():
        if isinstance(value, dict):
            yield from _leaves(value)
        elif value is not None:
            yield str(key), value


def _doc_text(task, doc) -> str:
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice" and isinstance(target, int):
        target = task.doc_to_choice(doc)[target]
    return f"{task.doc_to_text(doc)} {target}"


def evaluate_model(model, tokenizer, names: list[str], tasks, num_fewshot: int, limit: int | None,
                   batch_size: int, seed: int) -> dict:
    """Run the tasks on a loaded model (or adapter-wrapped model) through lm-eval's HF backend."""
    lm = harness_model(model, tokenizer, batch_size)
    return _simple_evaluate(lm, None, names, tasks, num_fewshot, limit, seed)


def harness_model(model, tokenizer, batch_size: int):
    """lm-eval's HFLM around an already loaded model (it drops the virtual tokens of prompt-learning adapters)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def evaluate_endpoint(endpoint: str, model_name: str, headers: dict[str, str], tokenizer_dir: Path,
                      names: list[str], tasks, num_fewshot: int, limit: int | None, batch_size: int,
                      seed: int) -> dict:
    """Run the tasks against an OpenAI-compatible /v1/completions server (lm-eval's local-completions); scoring
    multiple choice needs the server's echoed prompt log-probs (`echo: true, logprobs: 1`), as `lifecycle serve`
    returns them."""
    args = {"model": model_name, "base_url": f"{endpoint}/completions", "tokenizer": str(tokenizer_dir),
            "tokenizer_backend": "huggingface", "tokenized_requests": True, "batch_size": batch_size,
            "num_concurrent": 1, "max_retries": 2, "seed": seed,
            **({"header": headers} if headers else {})}
    return _simple_evaluate("local-completions", args, names, tasks, num_fewshot, limit, seed)


def _simple_evaluate(model, model_args, names, tasks, num_fewshot, limit, seed) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(names), num_fewshot=num_fewshot,
                                   limit=limit, task_manager=tasks, log_samples=False, bootstrap_iters=1000,
                                   random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                   fewshot_random_seed=seed, verbosity="ERROR")


def metrics(results: dict) -> dict:
    """lm-eval's {"results": {task: {"acc,none": x}}} as flat eval/task/<task>/<metric> numbers, with item counts."""
    out = {}
    for task, scores in results["results"].items():
        for key, value in scores.items():
            metric, _, filt = key.partition(",")
            if filt and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"eval/task/{task}/{metric if filt == 'none' else f'{metric}_{filt}'}"] = value
        if task in results.get("n-samples", {}):
            out[f"eval/task/{task}/items"] = results["n-samples"][task]["effective"]
    return out
