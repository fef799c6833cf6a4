"""The serving request log (lifecycle.serve.usage's `requests` table) over a window: per-request truth, so the
latency and TTFT percentiles are exact, not bucket estimates."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, inspect, select
from sqlalchemy.engine import make_url

from lifecycle.monitor.traffic import QUANTILES, quantile_key, request_metrics
from lifecycle.serve.limits import outcome_of
from lifecycle.serve.usage import NoUsage, requests_table


def read_rows(url: str, since: float, until: float) -> list[dict]:
    """(status, latency_ms, ttft_ms, completion_tokens) of every request with since <= ts < until, read-only."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).is_file():
            raise NoUsage(url)
    engine = create_engine(url)
    try:
        if not inspect(engine).has_table(requests_table.name):
            raise NoUsage(url)
        t = requests_table
        query = select(t.c.status, t.c.latency_ms, t.c.ttft_ms, t.c.completion_tokens).where(t.c.ts >= since,
                                                                                              t.c.ts < until)
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
    finally:
        engine.dispose()


def window_metrics(rows: list[dict], seconds: float) -> dict[str, float]:
    """Requests, rates and shares by outcome, and exact latency/TTFT percentiles (numpy's linear method)."""
    outcomes: dict[str, float] = {}
    for r in rows:
        outcomes[outcome_of(r["status"])] = outcomes.get(outcome_of(r["status"]), 0) + 1
    tokens = sum(r["completion_tokens"] or 0 for r in rows)
    metrics = request_metrics(outcomes, seconds, tokens)
    for kind, column in (("latency", "latency_ms"), ("ttft", "ttft_ms")):
        values = np.array([r[column] for r in rows if r[column] is not None], dtype=float)
        if values.size:
            for q, v in zip(QUANTILES, np.quantile(values, QUANTILES)):
                metrics[quantile_key(kind, q)] = float(v)
    return metrics
