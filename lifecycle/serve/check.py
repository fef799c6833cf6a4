"""`lifecycle serve check.requests=N`: once ready, the server sends itself N real streaming requests over HTTP
(`concurrency` at a time), measures them like a client would, then drains and exits. The pipeline uses it to prove
the served model answers, and the cost stage prices serving from its throughput."""
from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import numpy as np

PROMPTS = ("def __init__(self,", "import os\nimport sys\n", "class Parser:\n    def", "    for key in",
           "def main():\n", "    return", "# Copyright", "with open(")


async def self_check(url: str, key: str, model: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    """Send `requests` streaming completions, `concurrency` at a time: latency, TTFT and throughput figures."""
    gate, results = asyncio.Semaphore(concurrency), []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
        async def one(i: int) -> None:
            async with gate:
                results.append(await _stream(client, model, PROMPTS[i % len(PROMPTS)], max_tokens, seed=i))
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - started
    return _figures(results, wall, concurrency)


async def _stream(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, seed: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed}
    r = await stream_completion(client, body)
    # A server that sends no usage chunk is counted one token per text chunk (OpenAI streams one token per chunk).
    return {"status": r["status"], "latency": r["end"] - r["started"], "ttft": (r["first"] or r["end"]) - r["started"],
            "tokens": r["usage_tokens"] or r["chunks"]}


async def stream_completion(client: httpx.AsyncClient, body: dict) -> dict:
    """POST a streaming /v1/completions (usage requested) and time it as a client sees it: the status, the
    perf_counter times of the start, first and last text chunk and the end, the text, its chunks and the usage
    chunk's completion_tokens (0 when the server sends none). Also used by benchmarks/serve_sweep.py."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    started, first, last, usage, text = time.perf_counter(), None, None, 0, []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
                text.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
    return {"status": response.status_code, "started": started, "first": first, "last": last,
            "end": time.perf_counter(), "text": "".join(text), "chunks": len(text), "usage_tokens": usage}


def _figures(results: list[dict], wall: float, concurrency: int) -> dict:
    ok = [r for r in results if r["status"] == 200 and r["tokens"] > 0]
    if not ok:
        return {"serve/check_requests": len(results), "serve/check_ok": 0}
    ms = lambda key, q: round(float(np.percentile([r[key] for r in ok], q)) * 1000, 1)  # noqa: E731
    per_token = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    return {"serve/check_requests": len(results), "serve/check_ok": len(ok), "serve/check_concurrency": concurrency,
            "serve/latency_ms_p50": ms("latency", 50), "serve/latency_ms_p99": ms("latency", 99),
            "serve/ttft_ms_p50": ms("ttft", 50), "serve/ttft_ms_p99": ms("ttft", 99),
            "serve/tpot_ms_p50": round(statistics.median(per_token) * 1000, 2) if per_token else None,
            "serve/tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
            "serve/requests_per_s": round(len(ok) / wall, 2)}
