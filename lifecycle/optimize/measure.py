"""What a model costs and buys: parameters, size on disk, perplexity, decode speed, time to first token, memory."""
from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import torch

from lifecycle.evaluate import intrinsic


class PeakMemory:
    """Peak memory above the level at entry, in MB: CUDA's max allocated, or the process RSS sampled every 5 ms."""

    def __init__(self, device: str = "cpu"):
        self.cuda, self.mb = device.startswith("cuda"), 0.0

    def __enter__(self) -> "PeakMemory":
        import psutil

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.process, self.stop = psutil.Process(), threading.Event()
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
            return
        self.stop.set()
        self.thread.join()
        self.mb = (max(self.peak, self.process.memory_info().rss) - self.start) / 2**20


def count_params(model) -> int:
    """Stored parameters, the int8 matrices of quantized Linears included."""
    from lifecycle.models.int8 import quantized_names

    modules = dict(model.named_modules())
    quantized = sum(modules[n].weight().numel() + (modules[n].bias().numel() if modules[n].bias() is not None else 0)
                    for n in quantized_names(model))
    return sum(p.numel() for p in model.parameters()) + quantized


def weights_mb(*directories: Path) -> float:
    """Size on disk of the weight files (every *.safetensors) of the given directories."""
    return sum(p.stat().st_size for d in directories for p in Path(d).glob("*.safetensors")) / 1e6


def quality(model, tokenizer, data) -> dict:
    """Held-out perplexity on the general (val.bin windows) and the domain (instruction chats) split."""
    data_dir = Path(data.dir)
    return {"ppl_general": intrinsic.general(model, tokenizer, data_dir, data.seq_len, data.batch_size,
                                             data.val_batches)["ppl"],
            "ppl_domain": intrinsic.domain(model, tokenizer, data_dir, data.batch_size, data.val_batches)["ppl"]}


def speed(model, tokenizer, data_dir: Path, bench) -> dict:
    """Greedy decoding from held-out prompts: first-call warm-up, time to first token, decode tokens/s per batch."""
    from lifecycle.data.shards import open_split

    tokens, _ = open_split(Path(data_dir), "val")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    threads = torch.get_num_threads()
    torch.set_num_threads(bench.threads or threads)
    try:
        return _timings(model, tokens, pad, bench) | {"threads": torch.get_num_threads(),
                                                        "load_avg": round(os.getloadavg()[0], 2)}
    finally:
        torch.set_num_threads(threads)


def _timings(model, tokens, pad: int, bench) -> dict:
    out = {}
    for i, b in enumerate(bench.batch_sizes):
        ids = torch.from_numpy(tokens[:b * bench.prompt_tokens].astype("int64")).view(b, bench.prompt_tokens)  # (B, P)
        started = time.perf_counter()
        _generate(model, ids, bench.new_tokens, pad)  # warm-up: compiled variants compile here
        if i == 0:
            out["warmup_s"] = time.perf_counter() - started
        first = statistics.median(_timed(model, ids, 1, pad) for _ in range(bench.repeats))
        full = statistics.median(_timed(model, ids, bench.new_tokens, pad) for _ in range(bench.repeats))
        out[f"tok_s_b{b}"] = b * (bench.new_tokens - 1) / max(full - first, 1e-9)  # decode only: prefill excluded
        if i == 0:
            out["ttft_ms"] = first * 1000
    return out


def _timed(model, ids: torch.Tensor, new_tokens: int, pad: int) -> float:
    started = time.perf_counter()
    _generate(model, ids, new_tokens, pad)
    return time.perf_counter() - started


def _generate(model, ids: torch.Tensor, new_tokens: int, pad: int) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=pad)
