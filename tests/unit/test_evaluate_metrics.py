"""Intrinsic metrics against a plain-torch computation; our task items and the contamination share, by construction."""
from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch

from lifecycle.data.instruct import CODE_INSTRUCTION
from lifecycle.evaluate import contamination, intrinsic, tasks
from lifecycle.training.instruct_data import CHAT_TEMPLATE, encode_chat
from lifecycle.training.module import IGNORE


@pytest.fixture(scope="module")
def tiny(data_dir):
    """A random 2-layer Llama over the data run's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval(), tokenizer


def nats_of(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Summed next-token NLL of one unpadded sequence, positions with label IGNORE left out."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return sum(-logp[i, t].item() for i, t in enumerate(labels) if t != IGNORE), sum(t != IGNORE for t in labels)


def test_general_split_matches_a_plain_loop(tiny, data_dir):
    model, tokenizer = tiny
    got = intrinsic.general(model, tokenizer, data_dir, seq_len=32, batch_size=4, batches=3)
    meta = json.loads((data_dir / "meta.json").read_text())
    tokens = np.fromfile(data_dir / "val.bin", dtype=meta["dtype"]).astype(np.int64).tolist()
    nats = count = 0
    for i in range(12):  # 3 batches of 4 consecutive windows
        window = tokens[i * 32:i * 32 + 33]
        n, c = nats_of(model, window[:-1], window[1:])
        nats, count = nats + n, count + c
    n_bytes = len(tokenizer.decode(tokens[1:12 * 32 + 1], skip_special_tokens=True).encode())
    assert got["tokens"] == count == 384 and got["bytes"] == n_bytes
    assert got["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nats / count), rel=1e-5)
    assert got["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)


def test_domain_split_matches_unpadded_examples_scored_one_by_one(tiny, data_dir):
    model, tokenizer = tiny
    got = intrinsic.domain(model, tokenizer, data_dir, batch_size=3, batches=None)  # uneven last batch, padding
    tokenizer.chat_template = tokenizer.chat_template or CHAT_TEMPLATE
    nats = count = n_bytes = 0
    for line in (data_dir / "instruct" / "val.jsonl").read_text().splitlines():
        ids, labels, _ = encode_chat(tokenizer, json.loads(line)["messages"], 1025)
        if all(t == IGNORE for t in labels[1:]):
            continue
        n, c = nats_of(model, ids[:-1], labels[1:])
        nats, count = nats + n, count + c
        n_bytes += len(tokenizer.decode([t for t in labels[1:] if t != IGNORE], skip_special_tokens=True).encode())
    assert count > 0 and got["tokens"] == count and got["bytes"] == n_bytes
    assert got["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert got["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)


def python_file(name: str, n: int) -> str:
    return "\n".join(f"def {name}_{i}(value):\n    total_{name} = value * {i} + {name}_offset\n    return total_{name}"
                     for i in range(n))


@pytest.fixture
def data_run(tmp_path):
    """A minimal data-run layout: two held-out Python files, one training file, five instruction pairs."""
    (tmp_path / "clean").mkdir()
    val = [{"id": f"stdlib:{m}.py", "text": python_file(m, 20), "source": "stdlib", "kind": "code",
            "language": "python", "metadata": {}} for m in ("alpha", "beta")]
    train = [{**val[0], "id": "stdlib:copy.py", "text": "the quick brown fox jumps over the lazy dog " * 3}]
    for split, docs in (("val", val), ("train", train)):
        with gzip.open(tmp_path / "clean" / f"{split}-00000.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
    (tmp_path / "instruct").mkdir()
    pairs = [{"messages": [{"role": "user", "content": f"{CODE_INSTRUCTION}def f{i}(x):\n    \"\"\"Doc {i}.\"\"\"\n"},
                           {"role": "assistant", "content": f"    y = x + {i}\n    return y * {i}\n"}]}
             for i in range(5)]
    (tmp_path / "instruct" / "val.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return tmp_path


def test_next_line_items_hold_the_true_line_and_distractors_from_other_files(data_run):
    items = tasks.next_line_items(data_run, context_lines=3, choices=4, max_items=30, seed=1)
    assert len(items) == 30
    texts = {"alpha": python_file("alpha", 20).splitlines(), "beta": python_file("beta", 20).splitlines()}
    for item in items:
        name, line = item["id"].removeprefix("stdlib:").split(".py:")
        lines, j = texts[name], int(line) - 1
        assert item["choices"][item["label"]] == lines[j]
        assert item["context"] == "\n".join(lines[j - 3:j]) + "\n"
        other = "beta" if name == "alpha" else "alpha"
        distractors = [c for i, c in enumerate(item["choices"]) if i != item["label"]]
        assert len(set(item["choices"])) == 4 and all(other in d for d in distractors)
    assert tasks.next_line_items(data_run, 3, 4, 30, seed=1) == items
    assert tasks.next_line_items(data_run, 3, 4, 30, seed=2) != items


def test_docstring_code_items_pair_each_signature_with_its_body(data_run):
    items = tasks.docstring_code_items(data_run, context_lines=6, choices=4, max_items=10, seed=0)
    assert len(items) == 5
    for item in items:
        i = int(item["context"].split("(")[0].removeprefix("def f"))
        assert item["choices"][item["label"]] == f"    y = x + {i}\n    return y * {i}\n"
        assert len(set(item["choices"])) == 4


def test_contamination_share_counts_items_sharing_an_ngram_with_training_text(data_run):
    clean = "a b c d e f g h i j k l m n o p"
    dirty = "so it goes: the quick brown fox jumps over the lazy dog the quick brown fox jumps"
    shares = contamination.shares({"t": [clean, dirty, "short"], "u": [clean]}, data_run, ngram=13)
    assert shares == {"t": pytest.approx(1 / 3), "u": 0.0}
