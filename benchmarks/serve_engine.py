"""Serving engine throughput: LocalEngine (continuous batching) against HF generate() eager, greedy, on one model.

32 fixed prompts (seeded random token ids, 8-64 tokens), 128 new tokens each. Four runs, interleaved so a busy
machine hurts all alike: HF batch 1 (one prompt after another), engine batch 1, HF batch 8 (left-padded batches of 8),
engine with 8 concurrent requests (a new request starts as soon as one finishes). Tokens/s counts real tokens
(up to and including EOS); TTFT is time to the first event for the engine and a max_new_tokens=1 generate() for HF.
The engine's tokens must equal HF batch-1 greedy tokens. Figures go to benchmarks/results/serve_engine.json.

    python benchmarks/serve_engine.py                    # outputs/pretrain/latest/model, else a conf-sized tiny Llama
    python benchmarks/serve_engine.py --prompts 8 --new-tokens 32 --threads 2

Finding (outputs/pretrain/latest/model: Llama 6 x 320, 8,192 vocab; 32 x 128 tokens; --threads 1 because the 2 shared
cores ran at load ~8 from other jobs, where 2 threads made every figure erratic):
    run                  tokens/s  TTFT p50 ms  seconds  = HF b1
    hf_batch1                42.1         39.4     97.3   32/32
    engine_batch1            47.1         43.9     87.0   32/32
    hf_batch8 (padded)      155.8        222.8     26.3   32/32
    engine_concurrent8      167.8        271.0     24.4   32/32
8 concurrent = 3.56x the engine's batch 1, 3.99x HF batch 1, 1.08x HF's padded batch 8. A decode step costs the same
as HF's (same forward; the cache is written in place instead of concatenated); batch 8 costs ~2.4x batch 1 per step.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lifecycle.models.load import load_model  # noqa: E402
from lifecycle.serve.engine import LocalEngine  # noqa: E402
from lifecycle.serve.protocol import GenerationRequest, Sampling  # noqa: E402


def model_dir(tmp: Path) -> Path:
    """The latest pretrained model, or a random Llama with conf/model/tiny_llama.yaml's dims (+ a BPE tokenizer)."""
    trained = ROOT / "outputs/pretrain/latest/model"
    if (trained / "config.json").is_file():
        return trained
    import yaml

    from lifecycle.data.tokenizer import train_bpe
    from lifecycle.models.build import llama

    dims = {k: v for k, v in yaml.safe_load((ROOT / "conf/model/tiny_llama.yaml").read_text()).items()
            if k != "_target_"}
    texts = [p.read_text(errors="replace") for p in sorted((ROOT / "lifecycle").rglob("*.py"))]
    tokenizer = train_bpe(texts, vocab_size=8192, min_frequency=2)
    torch.manual_seed(0)
    model = llama(**dims, vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    return tmp / "model"


def fixed_prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    lengths = torch.randint(8, 65, (n,), generator=g).tolist()
    return [torch.randint(2, vocab, (length,), generator=g).tolist() for length in lengths]


def until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def hf_run(model, prompts, new_tokens: int, batch: int, pad: int, eos: int) -> dict:
    """HF generate() eager over `prompts` in left-padded batches of `batch`."""
    outputs, ttft, start = [], [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        ids, mask = left_pad(prompts[i:i + batch], pad)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=pad)
        outputs += [until_eos(row[ids.shape[1]:].tolist(), eos) for row in out]
    wall = time.perf_counter() - start
    for i in range(0, len(prompts), batch):  # TTFT apart, so it does not slow the throughput run
        ids, mask = left_pad(prompts[i:i + batch], pad)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=pad)
        ttft.append(time.perf_counter() - t0)
    return summary(outputs, wall, ttft)


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # (batch, width)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


async def engine_run(engine: LocalEngine, prompts, new_tokens: int, concurrency: int) -> dict:
    """`concurrency` clients, each taking the next prompt as soon as its previous request finished."""
    outputs, ttft, todo = [None] * len(prompts), [], iter(range(len(prompts)))

    async def client():
        for i in todo:
            t0, ids = time.perf_counter(), []
            request = GenerationRequest(prompts[i], Sampling(max_tokens=new_tokens, temperature=0), engine.name)
            async for event in engine.generate(request):
                if not ids:
                    ttft.append(time.perf_counter() - t0)
                ids += event.token_ids
            outputs[i] = ids
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return summary(outputs, time.perf_counter() - start, ttft)


def summary(outputs, wall: float, ttft: list[float]) -> dict:
    n = sum(map(len, outputs))
    return {"tokens": n, "seconds": round(wall, 2), "tokens_per_s": round(n / wall, 1),
            "ttft_ms_p50": round(1000 * statistics.median(ttft), 1), "outputs": outputs}


async def main(args) -> dict:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        directory = model_dir(Path(tmp))
        model, tokenizer = load_model(directory)
        prompts = fixed_prompts(args.prompts, len(tokenizer))
        pad, eos = tokenizer.pad_token_id or 0, tokenizer.eos_token_id
        engine = LocalEngine(str(directory), max_batch_size=args.concurrency, max_queue=len(prompts),
                             threads=args.threads)
        await engine.start()
        await engine_run(engine, prompts[:2], 4, 1)  # warm-up
        hf_run(model, prompts[:2], 4, 1, pad, eos)
        runs = {"hf_batch1": hf_run(model, prompts, args.new_tokens, 1, pad, eos),
                "engine_batch1": await engine_run(engine, prompts, args.new_tokens, 1),
                f"hf_batch{args.concurrency}": hf_run(model, prompts, args.new_tokens, args.concurrency, pad, eos),
                f"engine_concurrent{args.concurrency}": await engine_run(engine, prompts, args.new_tokens,
                                                                         args.concurrency)}
        await engine.stop()
    return report(runs, args, str(directory) if "outputs" in str(directory) else "random tiny_llama dims")


def report(runs: dict, args, model: str) -> dict:
    reference = runs["hf_batch1"]["outputs"]
    same = {name: sum(a == b for a, b in zip(run["outputs"], reference)) for name, run in runs.items()}
    print(f"model: {model}; {args.prompts} prompts x {args.new_tokens} new tokens, greedy, {args.threads} threads")
    print(f"{'run':<22}{'tokens/s':>10}{'TTFT p50 ms':>13}{'seconds':>9}{'= HF b1':>9}")
    for name, run in runs.items():
        print(f"{name:<22}{run['tokens_per_s']:>10}{run['ttft_ms_p50']:>13}{run['seconds']:>9}"
              f"{same[name]:>6}/{len(reference)}")
    tps = {name: run["tokens_per_s"] for name, run in runs.items()}
    c = args.concurrency
    ratios = {f"engine_c{c}/engine_b1": tps[f"engine_concurrent{c}"] / tps["engine_batch1"],
              f"engine_c{c}/hf_b1": tps[f"engine_concurrent{c}"] / tps["hf_batch1"],
              f"engine_c{c}/hf_b{c}": tps[f"engine_concurrent{c}"] / tps[f"hf_batch{c}"],
              "engine_b1/hf_b1": tps["engine_batch1"] / tps["hf_batch1"]}
    print("  ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    return {"model": model, "prompts": args.prompts, "new_tokens": args.new_tokens, "threads": args.threads,
            "runs": {name: {k: v for k, v in run.items() if k != "outputs"} for name, run in runs.items()},
            "identical_to_hf_batch1": same, "ratios": {k: round(v, 2) for k, v in ratios.items()}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_engine.json")
    args = parser.parse_args()
    result = asyncio.run(main(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
