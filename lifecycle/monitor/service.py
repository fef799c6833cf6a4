"""One tick's service metrics from the configured sources: the server (its /metrics, or Prometheus when
`prometheus.url` is set) for the engine and the process, and the request log for the requests (when `db` is set;
else the server's counters). A source that fails is reported in `errors` and, with `strict`, raised."""
from __future__ import annotations

import time

from sqlalchemy.exc import SQLAlchemyError

from lifecycle.errors import LifecycleError
from lifecycle.monitor import promql, requestlog, scrape
from lifecycle.monitor.scrape import Snapshot, Unreachable
from lifecycle.monitor.traffic import NO_TRAFFIC, is_request_stat, no_traffic_keys


class Collector:
    """Reads every source for a tick; keeps the scrape history the direct mode needs for rates."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.history: list[Snapshot] = []

    def sources(self) -> dict[str, str]:
        cfg = self.cfg
        server = f"prometheus {cfg.prometheus.url}" if cfg.prometheus.url else f"{cfg.server.url}/metrics"
        return {"server": server, "requests": f"request log {_safe(cfg.db)}" if cfg.db else "the server's counters"}

    def collect(self, tick: int, strict: bool) -> dict:
        """{tick, ts, sources, metrics, absent, errors} for the window ending now."""
        now, cfg = time.time(), self.cfg
        metrics, absent, errors = {}, {}, {}
        try:
            metrics, absent = self._server()
        except Unreachable as e:
            if strict:
                raise
            errors["server"], metrics["serve/up"] = str(e), 0.0
        if cfg.db:
            metrics = {k: v for k, v in metrics.items() if not _request_key(k)}
            absent = {k: v for k, v in absent.items() if not _request_key(k)}
            try:
                rows = requestlog.read_rows(cfg.db, now - cfg.window_s, now)
                metrics |= requestlog.window_metrics(rows, cfg.window_s)
            except (LifecycleError, SQLAlchemyError) as e:
                if strict:
                    raise
                errors["requests"] = str(e).splitlines()[0]
        if metrics.get("serve/requests") == 0:
            absent |= {k: NO_TRAFFIC for k in no_traffic_keys() if k not in metrics}
        return {"tick": tick, "ts": now, "sources": self.sources(), "metrics": scrape.finite(metrics),
                "absent": absent, "errors": errors}

    def _server(self) -> tuple[dict, dict]:
        cfg = self.cfg
        if cfg.prometheus.url:
            return promql.service_metrics(cfg.prometheus.url, cfg.prometheus.selector, cfg.window_s,
                                          cfg.prometheus.timeout_s)
        snap = scrape.fetch(cfg.server.url, cfg.server.key_env, cfg.server.timeout_s)
        base = scrape.baseline(self.history, snap, cfg.window_s)
        self.history.append(snap)
        while len(self.history) > 1 and self.history[1].ts <= snap.ts - cfg.window_s:
            self.history.pop(0)  # keep the window, and the newest snapshot before it
        return scrape.service_metrics(snap, base, with_requests=not cfg.db)


def _request_key(key: str) -> bool:
    return is_request_stat(key) or key in ("serve/requests", "serve/window_s")


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
