"""Prometheus metrics of one server (its own registry, so several servers in one process stay apart)."""
from __future__ import annotations

import sys
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import ProcessCollector

# How a request ended. The load tests' invariant: sent = ok + rejected + unavailable + cancelled + timeout
# (+ client_error + error for bad requests and engine failures).
OUTCOMES = ("ok", "rejected", "unavailable", "cancelled", "timeout", "client_error", "error")
LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5)


class ServeMetrics:
    """Counters, histograms and gauges both front ends record into; `render()` is the /metrics body."""

    def __init__(self, stats: Callable[[], dict[str, int]] | None = None, ready: Callable[[], bool] | None = None):
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process CPU seconds, resident memory, open fds
        self.requests = Counter("lifecycle_requests", "Requests by front end, route, model and outcome",
                                ["frontend", "route", "model", "outcome"], registry=r)
        self.latency = Histogram("lifecycle_request_latency_seconds", "Whole-request latency",
                                 ["frontend", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lifecycle_time_to_first_token_seconds", "Time to the first generated token",
                              ["frontend"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("lifecycle_time_per_output_token_seconds", "Decode time per generated token after "
                              "the first", ["frontend"], buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("lifecycle_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("lifecycle_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.in_flight = Gauge("lifecycle_requests_in_flight", "Requests being handled by a front end",
                               ["frontend"], registry=r)
        running = Gauge("lifecycle_engine_running", "Jobs the engine is decoding", registry=r)
        queued = Gauge("lifecycle_engine_queued", "Jobs waiting for a decode slot", registry=r)
        up = Gauge("lifecycle_ready", "1 when the model is loaded and the server accepts requests", registry=r)
        if stats is not None:
            running.set_function(lambda: stats()["running"])
            queued.set_function(lambda: stats()["queued"])
        if ready is not None:
            up.set_function(lambda: float(ready()))
        _gpu_memory(r)

    def request(self, frontend: str, route: str, model: str, outcome: str, seconds: float) -> None:
        assert outcome in OUTCOMES, outcome
        self.requests.labels(frontend, route, model, outcome).inc()
        self.latency.labels(frontend, route).observe(seconds)

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.completion_tokens.labels(model).inc(completion)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _gpu_memory(registry: CollectorRegistry) -> None:
    """lifecycle_gpu_memory_bytes per CUDA device, only where this process has CUDA (the monitor reports it absent)."""
    torch = sys.modules.get("torch")  # never imported here for a front end that runs without torch
    if torch is None or not torch.cuda.is_available():
        return
    gauge = Gauge("lifecycle_gpu_memory_bytes", "GPU memory allocated by this process", ["device"], registry=registry)
    for i in range(torch.cuda.device_count()):
        gauge.labels(str(i)).set_function(lambda i=i: torch.cuda.memory_allocated(i))
