"""Instruction data for fine-tuning: chat-templated examples, loss on assistant tokens only."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from lifecycle.data.document import Skips
from lifecycle.data.instruct import read_jsonl
from lifecycle.errors import DataError
from lifecycle.training.datamodule import PackedDataModule
from lifecycle.training.module import IGNORE

# Used when the base tokenizer has none; saved with the fine-tuned tokenizer so serving renders chats identically.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def encode_chat(tokenizer, messages: list[dict], max_tokens: int) -> tuple[list[int], list[int], bool]:
    """Token ids of the rendered chat and labels that keep only assistant turns (and their end-of-turn)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            spans.append((start, len(tokenizer.apply_chat_template(messages[:i + 1], tokenize=False))))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [t if any(s <= a < e for s, e in spans) else IGNORE for t, (a, _) in zip(ids, enc["offset_mapping"])]
    truncated = len(ids) > max_tokens
    return ids[:max_tokens], labels[:max_tokens], truncated


class Examples(torch.utils.data.Dataset):
    """Encoded examples; item i = next-token input_ids and labels, each (T_i,)."""

    def __init__(self, rows: list[tuple[list[int], list[int]]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels = self.rows[i]
        return {"input_ids": torch.tensor(ids[:-1]), "labels": torch.tensor(labels[1:])}


class InstructDataModule(PackedDataModule):
    """Chat examples from `<dir>/instruct/{train,val}.jsonl` (the data stage's output), padded per batch."""

    def __init__(self, dir: str, seq_len: int, batch_size: int, val_batches: int, num_workers: int, seed: int,
                 packing: bool, *, tokenizer):
        super().__init__(dir, seq_len, batch_size, val_batches, num_workers, seed)
        self.packing, self.tokenizer = packing, tokenizer
        self.stats: Counter[str] = Counter()
        self.skips = Skips()

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "train_set", None) is not None:
            return
        self.train_set, self.val_set = (Examples(self._encode(s)) for s in ("train", "val"))

    def _encode(self, split: str) -> list[tuple[list[int], list[int]]]:
        path = self.dir / "instruct" / f"{split}.jsonl"
        if not path.is_file():
            raise DataError(f"{path}: missing; point data.dir at a `lifecycle data` run (it writes instruct/), "
                            "or list your own JSONL in the data stage's instruct.files")
        rows = []
        for record in read_jsonl(path, self.skips):
            ids, labels, truncated = encode_chat(self.tokenizer, record["messages"], self.seq_len + 1)
            self.stats[f"{split}_truncated"] += truncated
            if all(label == IGNORE for label in labels[1:]):
                self.stats[f"{split}_no_response_tokens"] += 1  # the response was cut off entirely
                continue
            rows.append((ids, labels))
        self.stats[f"{split}_examples"] = len(rows)
        if not rows:
            raise DataError(f"{path}: no usable examples ({json.dumps(self.skips.to_dict())}); check the file")
        return _pack(rows, self.seq_len + 1) if self.packing else rows

    def _loader(self, dataset, sampler):
        loader = super()._loader(dataset, sampler)
        loader.collate_fn = self.collate
        return loader

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest example: pad id in inputs, IGNORE in labels, 0 in the attention mask."""
        longest = max(x["input_ids"].numel() for x in items)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        batch = {"input_ids": torch.full((len(items), longest), pad),                 # (B, T)
                 "labels": torch.full((len(items), longest), IGNORE),                # (B, T)
                 "attention_mask": torch.zeros((len(items), longest), dtype=torch.long)}
        for i, x in enumerate(items):
            n = x["input_ids"].numel()
            batch["input_ids"][i, :n], batch["labels"][i, :n], batch["attention_mask"][i, :n] = \
                x["input_ids"], x["labels"], 1
        return batch


def _pack(rows: list[tuple[list[int], list[int]]], length: int) -> list[tuple[list[int], list[int]]]:
    """Greedily concatenate whole examples into sequences of at most `length` tokens (fewer pad tokens)."""
    packed, ids, labels = [], [], []
    for a, b in rows:
        if ids and len(ids) + len(a) > length:
            packed.append((ids, labels))
            ids, labels = [], []
        ids, labels = ids + a, labels + b
    if ids:
        packed.append((ids, labels))
    return packed
