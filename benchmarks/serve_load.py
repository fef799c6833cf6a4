"""Serving under load: `lifecycle serve` and `transformers serve --continuous-batching` on the same model directory,
driven alternately by the same OpenAI-compatible streaming client at each concurrency.

For each server and concurrency: TTFT and time per output token (p50/p99), requests/s, aggregate output tokens/s
and failed requests; then our tokens/s at the highest concurrency over our own at concurrency 1 (the batching goal
is >= 3x) and ours over the peer's. Figures go to benchmarks/results/serve_load.json (its "metrics" hold ours at the
highest concurrency, so `lifecycle cost serving.benchmark=...` can price serving from it).

    python benchmarks/serve_load.py --model outputs/pretrain/latest/model --concurrency 1 4 8 --requests 32

Finding (2026-11-29, 11M Llama 6 x 320, 24 requests x 64 tokens per level, 2 threads, quiet 2-core machine):
ours 53.6 / 134.1 / 208.2 output tok/s at concurrency 1 / 4 / 8 (c8 = 3.88x c1), transformers serve
--continuous-batching 35.0 / 152.9 / 255.2 (its c1 p99 TTFT of 10.7 s is its first-request warm-up); 0 failures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lifecycle.serve.check import self_check  # noqa: E402  (the same client the pipeline's self-check uses)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + path, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"not ready after {timeout:.0f} s")


def start_ours(model: Path, key: str, threads: int, batch: int) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lifecycle.serve", f"deploy.engine.model={model}", f"port={port}",
           f"deploy.engine.threads={threads}", f"deploy.engine.max_batch_size={batch}", "deploy.engine.name=bench",
           "deploy.engine.max_queue=256", f"hydra.run.dir=/tmp/serve_load/ours-{port}",
           "usage.db=sqlite:////tmp/serve_load/usage.db"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "LIFECYCLE_API_KEYS": key},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "/ready", 180)
    return proc, url, "bench"


def start_peer(model: Path, threads: int) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    cmd = ["transformers", "serve", str(model.resolve()), "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--continuous-batching"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "/v1/models", 180)
    return proc, url, str(model.resolve())


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "outputs/pretrain/latest/model")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_load.json")
    args = p.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    key = secrets.token_urlsafe(16)
    servers = {"ours": lambda: start_ours(args.model, key, args.threads, max(args.concurrency))}
    if not args.no_peer:
        servers["transformers_serve_cb"] = lambda: start_peer(args.model, args.threads)
    runs: dict[str, dict] = {}
    for name, start in servers.items():
        try:
            proc, url, model = start()
        except (RuntimeError, OSError) as e:
            print(f"{name}: could not start ({e}); skipped", flush=True)
            continue
        try:
            for c in args.concurrency:
                figures = asyncio.run(self_check(url, key, model, args.requests, c, args.max_tokens))
                runs[f"{name}_c{c}"] = figures
                print(f"{name:24s} c={c}: " + ", ".join(f"{k.removeprefix('serve/')} {v}" for k, v in figures.items()
                                                       if "check_" not in k), flush=True)
        finally:
            stop(proc)
    report(runs, args)


def report(runs: dict, args) -> None:
    top, low = max(args.concurrency), min(args.concurrency)
    ours_top, ours_low = runs.get(f"ours_c{top}", {}), runs.get(f"ours_c{low}", {})
    peer_top = runs.get(f"transformers_serve_cb_c{top}", {})
    tps = "serve/tokens_per_s"
    ratios = {}
    if ours_top.get(tps) and ours_low.get(tps):
        ratios[f"ours_c{top}_over_ours_c{low}"] = round(ours_top[tps] / ours_low[tps], 2)
    if ours_top.get(tps) and peer_top.get(tps):
        ratios[f"ours_over_peer_c{top}"] = round(ours_top[tps] / peer_top[tps], 2)
    failed = {k: v["serve/check_requests"] - v["serve/check_ok"] for k, v in runs.items()}
    print("\nratios:", ratios, "| failed requests:", failed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(args.model), "requests": args.requests, "max_tokens": args.max_tokens,
                                    "threads": args.threads, "runs": runs, "ratios": ratios, "failed": failed,
                                    "metrics": ours_top}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
