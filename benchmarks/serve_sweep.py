"""B4, serving under load: Poisson arrivals at a sweep of request rates against every server, alternately.

All servers serve the same model directory and stay up together; for each rate (requests/s) the same seeded
Poisson schedule of `--requests` streaming `/v1/completions` (a `--prompt-tokens` prompt cut from stdlib source,
`--max-tokens` out, greedy unless --temperature says otherwise: OpenAI clients sample at 1 by default) is sent
to each server in turn, open loop (a request is sent at its arrival time whatever is still running). Per server and rate: p50/p99 TTFT, p50/p99 time per output token (TPOT: (end - first
token) / (tokens - 1)), output tokens/s, failures. The figure of merit is the highest rate meeting the SLO (p99 TTFT
<= --ttft-ms and p99 TPOT <= --tpot-ms with no failures); goal: ours >= 1x the best peer's. A server stops being
swept after two rates that miss the SLO (the load is bounded). Peers, each skipped with the reason if missing:
  transformers_serve_cb  `transformers serve --continuous-batching`
  hf_fastapi             benchmarks/peers/hf_fastapi_server.py: FastAPI + HF generate(), one thread per request
  llama_cpp              `python -m llama_cpp.server` (llama-cpp-python, in --peer-python's venv) on the model
                         converted to GGUF f32 by benchmarks/peers/gguf.py; one request at a time, queued
                         (--interrupt_requests False: by default a new request cuts the running one short)
Output tokens are counted from the usage chunk when a server sends one, else by tokenizing the streamed text.
Figures go to benchmarks/results/serve_sweep.json.

    python benchmarks/serve_sweep.py --rates 0.5 1 2 4 8 --requests 24
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_load import free_port, start_ours, start_peer, stop, wait_ready  # noqa: E402

from lifecycle.serve.check import stream_completion  # noqa: E402  (the pipeline self-check's client)


def start_hf_fastapi(model: Path, threads: int) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks/peers/hf_fastapi_server.py"), str(model),
                             "--port", str(port), "--threads", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "/v1/models", 180)
    return proc, url, str(model)


def start_llama_cpp(gguf: Path, python: Path, threads: int, ctx: int) -> tuple[subprocess.Popen, str, str]:
    if not gguf.is_file():
        raise RuntimeError(f"no {gguf}; convert with benchmarks/peers/gguf.py")
    port = free_port()
    proc = subprocess.Popen([str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_threads", str(threads), "--n_ctx", str(ctx),
                             "--model_alias", "gguf", "--interrupt_requests", "False"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "/v1/models", 180)
    return proc, url, "gguf"


def prompts(tokenizer, n: int, length: int, seed: int) -> list[str]:
    """n texts of `length` tokens each, cut at random places from stdlib source."""
    rng, texts = random.Random(seed), []
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    while len(texts) < n:
        ids = tokenizer(rng.choice(files).read_text(encoding="utf-8", errors="replace")).input_ids
        if len(ids) > 4 * length:
            start = rng.randrange(len(ids) - length)
            texts.append(tokenizer.decode(ids[start:start + length]))
    return texts


async def one(client, model: str, prompt: str, max_tokens: int, count, temperature: float = 0.0) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
    try:
        r = await stream_completion(client, body)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return {"ok": False, "error": type(e).__name__}
    first, last = r["first"], r["last"]
    tokens = r["usage_tokens"] or count(r["text"])
    return {"ok": r["status"] == 200 and first is not None, "status": r["status"],
            "ttft": (first or r["started"]) - r["started"],
            "tpot": (last - first) / (tokens - 1) if first and tokens > 1 else None, "tokens": tokens, "end": r["end"]}


async def level(url: str, key: str, model: str, texts: list[str], gaps: list[float], max_tokens: int, count,
                timeout: float, temperature: float = 0.0) -> dict:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout) as client:
        started, tasks = time.perf_counter(), []
        for text, gap in zip(texts, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(client, model, text, max_tokens, count, temperature)))
        results = await asyncio.gather(*tasks)
    ok = [r for r in results if r["ok"]]
    wall = max((r["end"] for r in ok), default=time.perf_counter()) - started
    pct = lambda key, q: round(float(np.percentile([r[key] for r in ok if r[key] is not None], q)) * 1000, 1) \
        if any(r[key] is not None for r in ok) else None  # noqa: E731
    why = sorted({r.get("error") or (f"status {r['status']}" if r["status"] != 200 else "no text streamed")
                  for r in results if not r["ok"]})  # what failed, in short
    return {"requests": len(results), "failed": len(results) - len(ok), "failures": why, "ttft_ms_p50": pct("ttft", 50),
            "ttft_ms_p99": pct("ttft", 99), "tpot_ms_p50": pct("tpot", 50), "tpot_ms_p99": pct("tpot", 99),
            "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1) if ok else 0.0,
            "mean_output_tokens": round(float(np.mean([r["tokens"] for r in ok])), 1) if ok else 0.0}


def meets(figures: dict, ttft_ms: float, tpot_ms: float) -> bool:
    return (figures["failed"] == 0 and figures["ttft_ms_p99"] is not None and figures["ttft_ms_p99"] <= ttft_ms
            and figures["tpot_ms_p99"] is not None and figures["tpot_ms_p99"] <= tpot_ms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "outputs/pretrain/latest/model")
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    p.add_argument("--requests", type=int, default=24, help="requests per rate")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; 1: an OpenAI client's default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ttft-ms", type=float, default=500.0)
    p.add_argument("--tpot-ms", type=float, default=40.0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--servers", nargs="+", default=["ours", "transformers_serve_cb", "hf_fastapi", "llama_cpp"])
    p.add_argument("--gguf", type=Path, default=Path("/tmp/gguf/model-f32.gguf"))
    p.add_argument("--peer-python", type=Path, default=ROOT / ".benchvenv/bin/python")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=4,
                   help="untimed concurrent requests to each server before the sweep (0: none)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_sweep.json")
    args = p.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    count = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
    texts = prompts(tokenizer, args.requests, args.prompt_tokens, args.seed)
    ctx = 2 * (args.prompt_tokens + args.max_tokens) + 64
    key = secrets.token_urlsafe(16)
    starters = {"ours": lambda: start_ours(args.model, key, args.threads, 64),
                "transformers_serve_cb": lambda: start_peer(args.model, args.threads),
                "hf_fastapi": lambda: start_hf_fastapi(args.model, args.threads),
                "llama_cpp": lambda: start_llama_cpp(args.gguf, args.peer_python, args.threads, ctx)}
    servers, skipped = {}, {}
    for name in args.servers:
        try:
            servers[name] = starters[name]()
            print(f"{name}: up at {servers[name][1]}", flush=True)
        except (RuntimeError, OSError) as e:
            skipped[name] = str(e)
            print(f"{name}: skipped ({e})", flush=True)
    if args.warmup:  # untimed: a server's first requests (lazy set-up, allocator growth) stay out of every rate
        for name, (_, url, model) in servers.items():
            warm = asyncio.run(level(url, key, model, texts[:args.warmup], [0.0] * args.warmup, args.max_tokens,
                                     count, args.timeout, args.temperature))
            print(f"{name}: warm-up, {args.warmup} requests, failed {warm['failed']}", flush=True)
    runs: dict[str, dict[str, dict]] = {name: {} for name in servers}
    misses = {name: 0 for name in servers}
    try:
        for rate in args.rates:
            rng = random.Random(args.seed + int(rate * 1000))
            gaps = [0.0] + [rng.expovariate(rate) for _ in range(args.requests - 1)]
            for name, (_, url, model) in servers.items():
                if misses[name] >= 2:
                    continue
                figures = asyncio.run(level(url, key, model, texts, gaps, args.max_tokens, count, args.timeout,
                                            args.temperature))
                figures["slo_met"] = meets(figures, args.ttft_ms, args.tpot_ms)
                misses[name] = 0 if figures["slo_met"] else misses[name] + 1
                runs[name][str(rate)] = figures
                print(f"rate {rate:5.2f}/s {name:22s} " + ", ".join(f"{k} {v}" for k, v in figures.items()),
                      flush=True)
    finally:
        for proc, _, _ in servers.values():
            stop(proc)
    best = {name: max((float(r) for r, f in levels.items() if f["slo_met"]), default=0.0)
            for name, levels in runs.items()}
    peers = {n: v for n, v in best.items() if n != "ours"}
    top_peer = max(peers, key=peers.get) if peers else None
    ratio = round(best["ours"] / peers[top_peer], 2) if top_peer and peers[top_peer] and "ours" in best else None
    print(f"\nhighest rate meeting p99 TTFT <= {args.ttft_ms:.0f} ms and p99 TPOT <= {args.tpot_ms:.0f} ms: {best}")
    print(f"ours / best peer ({top_peer}): {ratio} | skipped: {skipped or 'none'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": str(args.model), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "runs": runs, "best_rate": best,
        "best_peer": top_peer, "ours_over_best_peer": ratio, "skipped": skipped}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
