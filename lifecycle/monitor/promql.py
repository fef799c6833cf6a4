"""The monitor's service metrics as PromQL over the server's exported names: one table that the Prometheus mode
queries, the generated alerting rules fire on and the Grafana dashboard draws."""
from __future__ import annotations

import time

import httpx

from lifecycle.monitor.scrape import MB, Unreachable
from lifecycle.monitor.traffic import CLIENT_ERRORS, NO_TRAFFIC, QUANTILES, SERVER_ERRORS, is_request_stat, quantile_key
from lifecycle.serve.metrics import OUTCOMES

REQUESTS = "lifecycle_requests_total"
API = 'route!="/metrics"'  # scrapes are counted by the server like any request; they are not traffic


def sel(selector: str, extra: str = "") -> str:
    """`{job="lifecycle",outcome=~"..."}` from the configured matchers and `extra` ones."""
    matchers = ",".join(m for m in (selector.strip().strip("{}"), extra) if m)
    return "{" + matchers + "}" if matchers else ""


def _share(outcomes: tuple[str, ...], s: str, w: str) -> str:
    matcher = 'outcome=~"' + "|".join(outcomes) + '"'
    return f"({_requests(s, w, matcher)} or vector(0)) / {_requests(s, w)}"  # no such outcome yet: 0, not absent


def _requests(s: str, w: str, extra: str = "", fn: str = "rate") -> str:
    return f"sum({fn}({REQUESTS}{sel(s, ','.join(m for m in (API, extra) if m))}[{w}]))"


def _quantile(q: float, histogram: str, s: str, w: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{sel(s, API)}[{w}]))) * 1000"


def expressions(s: str, w: str) -> dict[str, str]:
    """Metric key -> PromQL, for server matchers `s` and range `w` (e.g. `5m`, `300s`, `$__rate_interval`)."""
    table = {
        "serve/up": f"min(up{sel(s)})",
        "serve/requests": f'{_requests(s, w, fn="increase")} or vector(0)',
        "serve/requests_per_s": _requests(s, w),
        "serve/tokens_per_s": f"sum(rate(lifecycle_completion_tokens_total{sel(s)}[{w}]))",
        "serve/error_rate": _share(SERVER_ERRORS, s, w),
        "serve/client_error_rate": _share(CLIENT_ERRORS, s, w),
        "serve/share_429": _share(("rejected",), s, w),
        "serve/queue_depth": f"sum(lifecycle_engine_queued{sel(s)})",
        "serve/running": f"sum(lifecycle_engine_running{sel(s)})",
        "serve/ready": f"min(lifecycle_ready{sel(s)})",
        "serve/rss_mb": f"sum(process_resident_memory_bytes{sel(s)}) / {MB}",
        "serve/cpu_percent": f"sum(rate(process_cpu_seconds_total{sel(s)}[{w}])) * 100",
        "serve/gpu_memory_mb": f"sum(lifecycle_gpu_memory_bytes{sel(s)}) / {MB}",
    }
    for o in OUTCOMES:
        matcher = 'outcome="' + o + '"'
        table[f"serve/requests_{o}"] = f'{_requests(s, w, matcher, fn="increase")} or vector(0)'
    for q in QUANTILES:
        table[quantile_key("latency", q)] = _quantile(q, "lifecycle_request_latency_seconds", s, w)
        table[quantile_key("ttft", q)] = _quantile(q, "lifecycle_time_to_first_token_seconds", s, w)
    return table


def query(url: str, promql: str, timeout_s: float) -> float | None:
    """The single value of an instant query through /api/v1/query; None when it returns no series (or NaN)."""
    target = url.rstrip("/") + "/api/v1/query"
    try:
        response = httpx.get(target, params={"query": promql, "time": time.time()}, timeout=timeout_s)
        body = response.json()
    except (httpx.HTTPError, ValueError) as e:
        raise Unreachable(f"cannot query Prometheus at {target}: {type(e).__name__}: {e}; is it running there "
                          "(prometheus.url=...)?") from None
    if body.get("status") != "success":
        raise Unreachable(f"Prometheus at {target} refused `{promql}`: {body.get('error', response.text[:200])}")
    result = body["data"]["result"]
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if value != value else value  # NaN: e.g. a share over zero requests


def service_metrics(url: str, selector: str, window_s: float, timeout_s: float) -> tuple[dict, dict]:
    """(metrics, absent: key -> why) for the last `window_s` seconds, from Prometheus."""
    metrics, absent = {}, {}
    for key, promql in expressions(selector, f"{int(window_s)}s").items():
        value = query(url, promql, timeout_s)
        if value is None:
            absent[key] = f"no data in Prometheus for {promql}"
        else:
            metrics[key] = value
    if metrics.get("serve/requests", 0) < 0.5:  # no traffic: rates, shares and quantiles are not zeros
        for key in [k for k in metrics if is_request_stat(k)]:
            del metrics[key]
            absent[key] = NO_TRAFFIC
    metrics["serve/window_s"] = float(window_s)
    return metrics, absent
