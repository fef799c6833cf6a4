"""What the monitor reports about requests in a window, from outcome counts (the server's counters or the request
log's statuses): one definition for both sources, and for the PromQL in lifecycle.monitor.promql."""
from __future__ import annotations

import math

from lifecycle.serve.metrics import OUTCOMES

# Outcomes by HTTP status class (lifecycle.serve.limits.outcome_of): 429 rejected, 499 cancelled, 503 unavailable,
# 504 timeout; other 4xx client_error, other 5xx error.
SERVER_ERRORS = ("error", "timeout", "unavailable")        # 5xx: the service's fault
CLIENT_ERRORS = ("rejected", "cancelled", "client_error")  # 4xx, 429 and 499 included
QUANTILES = (0.5, 0.95, 0.99)
NO_TRAFFIC = "no traffic in the window"
RATE_KEYS = ("serve/requests_per_s", "serve/tokens_per_s", "serve/error_rate", "serve/client_error_rate",
             "serve/share_429")


def request_metrics(outcomes: dict[str, float], seconds: float, completion_tokens: float) -> dict[str, float]:
    """Requests, rates and shares by outcome; with no request in the window only `serve/requests` (0) is there."""
    n = sum(outcomes.values())
    out = {"serve/requests": n, "serve/window_s": seconds}
    if n <= 0 or seconds <= 0:
        return out
    out |= {"serve/requests_per_s": n / seconds, "serve/tokens_per_s": completion_tokens / seconds,
            "serve/error_rate": sum(outcomes.get(o, 0) for o in SERVER_ERRORS) / n,
            "serve/client_error_rate": sum(outcomes.get(o, 0) for o in CLIENT_ERRORS) / n,
            "serve/share_429": outcomes.get("rejected", 0) / n}
    return out | {f"serve/requests_{o}": outcomes.get(o, 0) for o in OUTCOMES}


def is_request_stat(key: str) -> bool:
    """A rate, share or quantile of requests: absent (not zero) when the window saw no request."""
    return key.startswith(("serve/requests_", "serve/tokens_per_s", "serve/error_rate", "serve/client_error_rate",
                           "serve/share_429", "serve/latency_ms_", "serve/ttft_ms_"))


def no_traffic_keys() -> list[str]:
    """What a window without requests leaves out (reported as absent: no traffic), rather than as zeros."""
    return [*RATE_KEYS, *(quantile_key(kind, q) for kind in ("latency", "ttft") for q in QUANTILES)]


def quantile_key(kind: str, q: float) -> str:
    """serve/latency_ms_p99 for ("latency", 0.99)."""
    return f"serve/{kind}_ms_p{round(q * 100)}"


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile over cumulative (upper bound, count) buckets ending at +Inf; None if empty."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # in the +Inf bucket: the highest finite bound, as Prometheus answers
            return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper
        lower, below = upper, count
    return lower
