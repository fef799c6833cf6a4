"""The server's own /metrics, read directly: parse the Prometheus text format into snapshots and turn two snapshots
(now and the start of the window) into the monitor's service metrics."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lifecycle.errors import LifecycleError
from lifecycle.monitor.traffic import QUANTILES, histogram_quantile, quantile_key, request_metrics
from lifecycle.serve.metrics import OUTCOMES

MB = 1 << 20
SCRAPE_ROUTE = "/metrics"  # ours and Prometheus's scrapes are counted by the server like any request
GPU_GAUGE = "lifecycle_gpu_memory_bytes"
HISTOGRAMS = {"latency": "lifecycle_request_latency_seconds", "ttft": "lifecycle_time_to_first_token_seconds"}


class Unreachable(LifecycleError):
    """The server (or Prometheus) did not answer, or answered with an error."""


@dataclass
class Snapshot:
    """Every sample of one scrape: (name, sorted labels) -> value, taken at `ts` (unix seconds)."""
    ts: float
    samples: dict[tuple[str, tuple], float] = field(default_factory=dict)

    def total(self, name: str, **match: str) -> float:
        """The sum of `name` over every series whose labels include `match`."""
        return sum(v for (n, labels), v in self.samples.items()
                   if n == name and all((k, m) in labels for k, m in match.items()))

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.samples)

    def buckets(self, histogram: str) -> list[tuple[float, float]]:
        """Cumulative (upper bound, count) of `histogram`, summed over its other labels, by bound."""
        out: dict[float, float] = {}
        for (n, labels), v in self.samples.items():
            if n == f"{histogram}_bucket":
                le = float(dict(labels)["le"])
                out[le] = out.get(le, 0.0) + v
        return sorted(out.items())


def parse(text: str, ts: float) -> Snapshot:
    """A Snapshot of a /metrics body (Prometheus text format), without the scrapes' own requests (not traffic)."""
    snap = Snapshot(ts)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("route") == SCRAPE_ROUTE:
                continue
            key = (s.name, tuple(sorted(s.labels.items())))
            snap.samples[key] = snap.samples.get(key, 0.0) + s.value
    return snap


def fetch(url: str, key_env: str | None, timeout_s: float) -> Snapshot:
    """Scrape <url>/metrics with the API key from the environment variable `key_env`."""
    key = os.environ.get(key_env) if key_env else None
    headers = {"authorization": f"Bearer {key}"} if key else {}
    target = url.rstrip("/") + "/metrics"
    try:
        response = httpx.get(target, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise Unreachable(f"cannot read {target}: {type(e).__name__}: {e or 'no answer'}; is `lifecycle serve` "
                          "running there (server.url=...)?") from None
    if response.status_code == 401:
        raise Unreachable(f"{target} answered 401: export a valid API key in ${key_env} (server.key_env)")
    if response.status_code != 200:
        raise Unreachable(f"{target} answered {response.status_code}: {response.text[:200]}")
    try:
        return parse(response.text, time.time())
    except ValueError as e:
        raise Unreachable(f"{target} did not answer in the Prometheus text format: {e}") from None


def baseline(history: list[Snapshot], now: Snapshot, window_s: float) -> Snapshot:
    """Where the window ending at `now` starts: the oldest earlier snapshot inside the window, else the newest one
    before it. The server's start (all counters zero) is one such snapshot; history from before a restart is not."""
    start = now.total("process_start_time_seconds") or None
    zero = [Snapshot(start)] if start is not None and start < now.ts else []
    candidates = zero + [s for s in history if s.ts < now.ts and (start is None or s.ts >= start)]
    if not candidates:
        return Snapshot(now.ts)
    inside = [s for s in candidates if s.ts >= now.ts - window_s]
    return inside[0] if inside else candidates[-1]


def service_metrics(now: Snapshot, base: Snapshot, with_requests: bool = True) -> tuple[dict, dict]:
    """(metrics, absent: key -> why) over [base.ts, now.ts]: requests (when `with_requests`) and the process."""
    seconds = now.ts - base.ts
    metrics, absent = _process(now, base, seconds)
    if with_requests:
        outcomes = {o: now.total("lifecycle_requests_total", outcome=o) - base.total("lifecycle_requests_total",
                    outcome=o) for o in OUTCOMES}
        tokens = now.total("lifecycle_completion_tokens_total") - base.total("lifecycle_completion_tokens_total")
        metrics |= request_metrics(outcomes, seconds, tokens)
        for kind, name in HISTOGRAMS.items():
            delta = [(le, c - dict(base.buckets(name)).get(le, 0.0)) for le, c in now.buckets(name)]
            for q in QUANTILES:
                value = histogram_quantile(q, delta)
                if value is not None:
                    metrics[quantile_key(kind, q)] = value * 1000
    return metrics, absent


def _process(now: Snapshot, base: Snapshot, seconds: float) -> tuple[dict, dict]:
    """Engine gauges, readiness, process CPU and memory, GPU memory where the server exports it."""
    metrics = {"serve/up": 1.0, "serve/queue_depth": now.total("lifecycle_engine_queued"),
               "serve/running": now.total("lifecycle_engine_running"), "serve/ready": now.total("lifecycle_ready")}
    absent = {}
    if now.has("process_resident_memory_bytes"):
        metrics["serve/rss_mb"] = now.total("process_resident_memory_bytes") / MB
        if seconds > 0:
            cpu = now.total("process_cpu_seconds_total") - base.total("process_cpu_seconds_total")
            metrics["serve/cpu_percent"] = 100 * cpu / seconds
    else:
        absent["serve/rss_mb"] = absent["serve/cpu_percent"] = "the server exports no process_* metrics"
    if now.has(GPU_GAUGE):
        metrics["serve/gpu_memory_mb"] = now.total(GPU_GAUGE) / MB
    else:
        absent["serve/gpu_memory_mb"] = f"the server exports no GPU memory gauge ({GPU_GAUGE})"
    return metrics, absent


def finite(metrics: dict) -> dict:
    """The metrics without NaN or infinite values (which JSON, rules and W&B all mishandle)."""
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}
