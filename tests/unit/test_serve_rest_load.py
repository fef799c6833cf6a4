"""Bounded load tests of the REST front end on loopback (TESTPLAN L1-L5): a few hundred requests each against the
fake engine. Every test checks the invariant sent = ok + 429 + 503 + cancelled + timed out against the server's
lifecycle_requests counters, and prints its figures (pytest -s)."""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families
from serve_rest_live import KEY, Live, events, idle, start_server_process, until

from lifecycle.serve.testing import FakeEngine

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
AUTH = {"authorization": f"Bearer {KEY}"}


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) in milliseconds."""
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, int(q / 100 * len(values)))]


async def drive(url: str, n: int, concurrency: int, one) -> list:
    """Run one(client, i) for i < n with `concurrency` workers; results in completion order."""
    todo, results = iter(range(n)), []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30, limits=limits) as client:
        async def worker():
            for i in todo:
                results.append(await one(client, i))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def tally(statuses: list[int]) -> dict[str, int]:
    """The client's view in the server's outcome names."""
    names = {200: "ok", 429: "rejected", 503: "unavailable", 499: "cancelled", 504: "timeout"}
    out: dict[str, int] = {}
    for s in statuses:
        out[names.get(s, str(s))] = out.get(names.get(s, str(s)), 0) + 1
    return out


def test_l1_steady_non_streaming():
    engine = FakeEngine(token_delay=0.002, max_batch_size=8, max_queue=8)
    with Live(engine) as live:
        async def one(client, i):
            start = time.monotonic()
            r = await client.post(CMPL, json={"prompt": f"p{i}", "max_tokens": 8})
            assert r.status_code != 200 or r.json()["choices"][0]["text"] == "hello wo"
            return r.status_code, time.monotonic() - start
        start = time.monotonic()
        results = asyncio.run(drive(live.url, 300, 8, one))
        elapsed = time.monotonic() - start
        latencies = [s for _, s in results]
        print(f"\nL1: 300 requests, 8 clients: {300 / elapsed:.0f} req/s, latency p50 {pct(latencies, 50):.1f} "
              f"p95 {pct(latencies, 95):.1f} p99 {pct(latencies, 99):.1f} ms")
        assert tally([s for s, _ in results]) == {"ok": 300} == scraped(live, CMPL)


def scraped(live, route: str) -> dict[str, float]:
    """lifecycle_requests_total for `route` by outcome, as Prometheus would scrape it from /metrics."""
    with live.client() as c:
        text = c.get("/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "lifecycle_requests_total" and s.labels["route"] == route:
                out[s.labels["outcome"]] = out.get(s.labels["outcome"], 0) + s.value
    return out


def test_l2_steady_streaming():
    engine = FakeEngine(token_delay=0.003, max_batch_size=8, max_queue=8)
    with Live(engine) as live:
        async def one(client, i):
            start, stamps, lines = time.monotonic(), [], []
            async with client.stream("POST", CHAT, json={"messages": [{"role": "user", "content": str(i)}],
                                                         "max_tokens": 16, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line:
                        lines.append(line)
                        stamps.append(time.monotonic())
            got = events(lines)  # every event parses
            assert got.count("[DONE]") == 1 and got[-1] == "[DONE]"
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in got[:-1])
            assert text == ("hello world " * 2)[:16]
            ttft = stamps[1] - start  # stamps[0]: the role chunk
            return r.status_code, ttft, [b - a for a, b in zip(stamps[1:-2], stamps[2:-1])]
        results = asyncio.run(drive(live.url, 150, 8, one))
        gaps = [g for *_, gs in results for g in gs]
        ttfts = [t for _, t, _ in results]
        print(f"\nL2: 150 streams x 16 tokens, 8 clients: TTFT p50 {pct(ttfts, 50):.1f} p99 {pct(ttfts, 99):.1f} ms,"
              f" inter-token p99 {pct(gaps, 99):.1f} ms")
        assert tally([s for s, *_ in results]) == {"ok": 150} == live.counters(CHAT)
        registry = live.metrics.registry
        assert registry.get_sample_value("lifecycle_time_to_first_token_seconds_count", {"frontend": "rest"}) == 150
        assert registry.get_sample_value("lifecycle_time_per_output_token_seconds_count", {"frontend": "rest"}) == 150
        assert registry.get_sample_value("lifecycle_completion_tokens_total", {"model": "fake"}) == 150 * 16


def test_l3_overload_fast_429_and_bounded_hold():
    engine = FakeEngine(token_delay=0.02, max_batch_size=4, max_queue=4)  # an accepted job: >= 0.2 s
    held, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            s = engine.stats()
            held[0] = max(held[0], s["running"] + s["queued"])
            time.sleep(0.001)
    with Live(engine) as live:
        async def one(client, i):
            start = time.monotonic()
            r = await client.post(CMPL, json={"prompt": "x", "max_tokens": 10})
            return r.status_code, time.monotonic() - start
        watcher = threading.Thread(target=watch)
        watcher.start()
        results = asyncio.run(drive(live.url, 300, 32, one))
        stop.set()
        watcher.join()
        rejected = [s for c, s in results if c == 429]
        accepted = [s for c, s in results if c == 200]
        print(f"\nL3: 300 requests, 32 clients, 4 slots + 4 queued: {len(accepted)} ok, {len(rejected)} 429; "
              f"429 p50 {pct(rejected, 50):.1f} p99 {pct(rejected, 99):.1f} ms, accepted p50 "
              f"{pct(accepted, 50):.1f} p99 {pct(accepted, 99):.1f} ms, max held {held[0]}")
        assert held[0] <= 8 and rejected and accepted
        # Bounds relative to the work, not absolute: a shared 2-core box stretches every figure alike.
        assert pct(rejected, 50) < pct(accepted, 50) / 2 and pct(accepted, 99) < 10_000
        assert tally([c for c, _ in results]) == live.counters(CMPL)


def test_l4_churn_disconnects_are_cancelled_and_nothing_leaks():
    # Streams of 0.6 s: a client leaving after its first token is always well before the end.
    engine = FakeEngine(token_delay=0.02, max_batch_size=16, max_queue=16)
    with Live(engine) as live:
        async def one(client, i):
            leave = i % 10 < 3  # 30% of clients go away after the first token
            async with client.stream("POST", CMPL, json={"prompt": "x", "max_tokens": 30, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if leave and line.startswith("data: "):
                        return 499
            return r.status_code
        asyncio.run(drive(live.url, 20, 10, one))  # warm-up
        rss = psutil.Process().memory_info().rss
        results = asyncio.run(drive(live.url, 120, 12, one))
        assert until(lambda: idle(engine) and live.in_flight() == 0, 2)
        growth = psutil.Process().memory_info().rss / rss - 1
        print(f"\nL4: 120 streams, 30% cut after the first token: {results.count(499)} cancelled, "
              f"{engine.cancelled - 6} jobs aborted, memory growth {100 * growth:.1f}%")
        assert tally(results) == {"ok": 84, "cancelled": 36}
        assert live.counters(CMPL) == {"ok": 84 + 14, "cancelled": 36 + 6}  # with the warm-up's 20
        assert engine.cancelled == 36 + 6 and growth < 0.05


def test_l5_sigterm_under_load_loses_nothing(tmp_path):
    proc, url, out = start_server_process(tmp_path, token_delay=0.01, drain=10)
    stop, statuses, lost = threading.Event(), [], []

    def client():
        with httpx.Client(base_url=url, headers=AUTH, timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.post(CMPL, json={"prompt": "x", "max_tokens": 20})
                except httpx.ConnectError:  # refused: the server is gone, nothing was sent
                    return
                except httpx.TransportError as e:  # sent but never answered: lost
                    lost.append(repr(e))
                    return
                statuses.append(r.status_code)
                if r.status_code == 503:  # the balancer's view: this replica is draining
                    return
    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    sent_at = time.monotonic()
    # If nothing happened to be in flight, the drain ends at once and the port is closed: also "not accepting".
    ready, late = _status_or_gone(lambda: httpx.get(f"{url}/ready")), \
        _status_or_gone(lambda: httpx.post(f"{url}{CMPL}", json={"prompt": "x"}, headers=AUTH))
    stop.set()
    for t in threads:
        t.join(15)
    assert proc.wait(15) == 0
    drained = time.monotonic() - sent_at
    statuses += [late] if late != "gone" else []
    client_view = tally(statuses)
    print(f"\nL5: SIGTERM after 1.5 s of 6 clients: {client_view}, exit 0 after {drained:.2f} s, lost {len(lost)}")
    assert ready in (503, "gone") and late in (503, "gone")
    assert not lost and set(client_view) <= {"ok", "unavailable"}
    assert json.loads(out.read_text())[CMPL] == client_view


def _status_or_gone(request) -> int | str:
    """The response's status, or "gone" when the server had closed its port (or closed it during the probe)."""
    try:
        return request().status_code
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
        return "gone"
