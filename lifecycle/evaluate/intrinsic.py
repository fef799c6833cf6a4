"""Intrinsic metrics on held-out data: loss, perplexity and bits per byte of the general and the domain split.

bits per byte = total nats / ln 2 / UTF-8 bytes of the scored text (special tokens are scored but have no bytes),
which, unlike perplexity, compares models with different tokenizers.
"""
from __future__ import annotations

import math
from pathlib import Path

from lifecycle.errors import DataError

LN2 = math.log(2)


def general(model, tokenizer, data_dir: Path, seq_len: int, batch_size: int, batches: int | None) -> dict:
    """The val.bin token windows of the data run, in order (the first `batches` batches; None: all)."""
    from torch.utils.data import DataLoader, Subset

    from lifecycle.data.shards import open_split
    from lifecycle.training.datamodule import Windows

    tokens, _ = open_split(data_dir, "val")
    _check_tokenizer(tokenizer, Path(data_dir) / "tokenizer")
    windows = Windows(tokens, seq_len)
    n = len(windows) if batches is None else min(len(windows), batches * batch_size)
    if n == 0:
        raise DataError(f"{data_dir}/val.bin holds {len(tokens)} tokens, fewer than one window of data.seq_len="
                        f"{seq_len}+1; lower data.seq_len")
    nats, count = score(model, DataLoader(Subset(windows, range(n)), batch_size=batch_size))
    # Consecutive windows: the scored labels are exactly tokens[1 : n*T + 1].
    text = tokenizer.decode(tokens[1:n * seq_len + 1].tolist(), skip_special_tokens=True)
    return summarize(nats, count, len(text.encode("utf-8")))


def _check_tokenizer(tokenizer, data_tokenizer_dir: Path) -> None:
    """val.bin holds token ids of the data run's tokenizer: a model with another one would score other text."""
    from transformers import AutoTokenizer

    if AutoTokenizer.from_pretrained(data_tokenizer_dir).get_vocab() != tokenizer.get_vocab():
        raise DataError(f"the model's tokenizer differs from the data run's ({data_tokenizer_dir}), so val.bin "
                        "would be read as other text; set data.dir to the data run the model was trained on")


def domain(model, tokenizer, data_dir: Path, batch_size: int, batches: int | None) -> dict:
    """instruct/val.jsonl chats rendered as fine-tuning renders them, scored on the assistant tokens only.

    Chats are cut at the model's context (not at data.seq_len: a short training window would cut most responses).
    """
    from torch.utils.data import DataLoader

    from lifecycle.data.document import Skips
    from lifecycle.data.instruct import read_jsonl
    from lifecycle.training.instruct_data import CHAT_TEMPLATE, Examples, InstructDataModule, encode_chat
    from lifecycle.training.module import IGNORE

    path = Path(data_dir) / "instruct" / "val.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: missing; point data.dir at a finished `lifecycle data` run (it writes instruct/)")
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE  # what fine-tuning uses (and saves) when the base has none
    seq_len, rows, scored_bytes = context_length(model), [], 0
    for record in read_jsonl(path, Skips()):
        ids, labels, _ = encode_chat(tokenizer, record["messages"], seq_len + 1)
        kept = [t for t in labels[1:] if t != IGNORE]
        if not kept:
            continue  # the response was truncated away entirely
        rows.append((ids, labels))
        scored_bytes += len(tokenizer.decode(kept, skip_special_tokens=True).encode("utf-8"))
        if batches is not None and len(rows) == batches * batch_size:
            break
    if not rows:
        raise DataError(f"{path}: no example has response tokens within the model's {seq_len}-token context")
    pad = InstructDataModule(data_dir, seq_len, batch_size, 1, 0, 0, False, tokenizer=tokenizer).collate
    nats, count = score(model, DataLoader(Examples(rows), batch_size=batch_size, collate_fn=pad))
    return summarize(nats, count, scored_bytes)


def context_length(model) -> int:
    """Positions the model can attend over, less any virtual tokens a prompt-learning adapter prepends."""
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    virtual = getattr(getattr(model, "active_peft_config", None), "num_virtual_tokens", None) or 0
    return positions - virtual


def score(model, loader) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) and the number of scored tokens over all batches."""
    import torch
    import torch.nn.functional as F
    from torchmetrics import SumMetric

    from lifecycle.training.module import IGNORE

    nats, count = SumMetric().set_dtype(torch.float64), SumMetric().set_dtype(torch.float64)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["labels"]                                                      # (B, T)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            logits = logits[:, -labels.shape[1]:]  # prompt-learning adapters prepend virtual tokens; (B, T, V)
            nats.update(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                                        reduction="sum"))
            count.update((labels != IGNORE).sum())
    return float(nats.compute()), int(count.compute())


def summarize(nats: float, tokens: int, n_bytes: int) -> dict:
    loss = nats / tokens
    return {"loss": loss, "ppl": math.exp(loss), "bpb": nats / LN2 / n_bytes if n_bytes else None,
            "tokens": tokens, "bytes": n_bytes}
