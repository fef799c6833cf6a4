"""Alert rules (each op, consecutive-tick and duration windows, bad rules), the request log's exact percentiles
against numpy, Prometheus's histogram_quantile, and the checked-in Prometheus rules and Grafana dashboard."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import ROOT, make_cfg
from lifecycle.errors import ConfigError
from lifecycle.monitor import export, requestlog
from lifecycle.monitor.rules import Alerts, Rule, load
from lifecycle.monitor.traffic import histogram_quantile
from lifecycle.serve.usage import UsageMeter, UsageRecord


def rule(op=">", threshold=1.0, ticks=1, seconds=None, action="none") -> Rule:
    return Rule("r", "serve/x", op, threshold, ticks, seconds, "warning", action)


@pytest.mark.parametrize("op,value,holds", [
    (">", 1.0, False), (">", 1.5, True), (">=", 1.0, True), (">=", 0.9, False),
    ("<", 1.0, False), ("<", 0.5, True), ("<=", 1.0, True), ("<=", 1.1, False),
])
def test_each_op(op, value, holds):
    assert rule(op).holds({"serve/x": value}) is holds
    assert rule(op).holds({}) is False  # absent metric: no traffic or no data never holds


def test_consecutive_ticks_fire_once_and_resolve():
    alerts = Alerts([rule(ticks=3)])
    seen = [alerts.evaluate({"serve/x": v}, float(t)) for t, v in enumerate([2, 2, 0, 2, 2, 2, 2, 0])]
    assert [[e["status"] for e in events] for events in seen] == [[], [], [], [], [], ["firing"], [], ["resolved"]]
    firing = seen[5][0]
    assert firing["value"] == 2 and firing["since"] == 3.0 and firing["condition"] == "serve/x > 1 for 3 tick(s)"


def test_absent_metric_breaks_the_streak():
    alerts = Alerts([rule(ticks=2)])
    assert alerts.evaluate({"serve/x": 5}, 0) == [] and alerts.evaluate({}, 1) == []
    assert alerts.evaluate({"serve/x": 5}, 2) == []
    assert alerts.evaluate({"serve/x": 5}, 3)[0]["status"] == "firing"


def test_duration_window_counts_seconds_not_ticks():
    alerts = Alerts([rule(ticks=None, seconds=30)])
    assert alerts.evaluate({"serve/x": 2}, 100) == [] and alerts.evaluate({"serve/x": 2}, 129) == []
    assert alerts.evaluate({"serve/x": 2}, 130)[0]["status"] == "firing"
    assert alerts.state(alerts.rules[0], {"serve/x": 2}) == "firing"


def test_rules_from_config_and_bad_rules():
    cfg = make_cfg("monitor", Path("/tmp/x/monitor/r"))
    rules = {r.name: r for r in load(OmegaConf.to_container(cfg.alerts, resolve=True))}
    assert rules["error_rate_high"].seconds == 120 and rules["server_down"].ticks == 2
    assert rules["token_drift"].action == "retrain"
    good = {"metric": "serve/x", "op": ">", "threshold": 1, "window": 2, "severity": "warning", "action": "none"}
    for change, match in [({"op": "=="}, "alerts.bad.op"), ({"severity": "page"}, "alerts.bad.severity"),
                          ({"action": "reboot"}, "alerts.bad.action"), ({"window": 0}, "alerts.bad.window"),
                          ({"window": "5 minutes"}, "alerts.bad.window"),
                          ({"threshold": "high"}, "alerts.bad.threshold"),
                          ({"metric": None}, "alerts.bad.metric"), ({"for": "5m"}, "alerts.bad.for")]:
        with pytest.raises(ConfigError, match=match):
            load({"bad": {**good, **change}})


def test_request_log_percentiles_equal_numpy(tmp_path):
    db = f"sqlite:///{tmp_path / 'usage.db'}"
    rng, now = np.random.default_rng(0), time.time()
    meter = UsageMeter(db)
    rows = []
    for i in range(200):
        row = UsageRecord("k", "m", "rest", "/v1/completions", int(rng.choice([200, 200, 200, 400, 429, 500, 503])),
                          completion_tokens=int(rng.integers(0, 50)), latency_ms=float(rng.lognormal(4, 1)),
                          ttft_ms=float(rng.lognormal(2, 1)) if i % 3 else None, ts=now - 250 * rng.random())
        rows.append(row)
        meter.record(row)
    for old in range(20):  # outside the window
        meter.record(UsageRecord("k", "m", "rest", "/v1/completions", 500, latency_ms=1e6, ts=now - 400 - old))
    meter.close()
    m = requestlog.window_metrics(requestlog.read_rows(db, now - 300, now + 1), 300)
    latency = [r.latency_ms for r in rows]
    ttft = [r.ttft_ms for r in rows if r.ttft_ms is not None]
    for q in (50, 95, 99):
        assert m[f"serve/latency_ms_p{q}"] == pytest.approx(np.percentile(latency, q))
        assert m[f"serve/ttft_ms_p{q}"] == pytest.approx(np.percentile(ttft, q))
    statuses = np.array([r.status for r in rows])
    assert m["serve/requests"] == 200 and m["serve/requests_per_s"] == pytest.approx(200 / 300)
    assert m["serve/error_rate"] == pytest.approx(np.mean(statuses >= 500))
    assert m["serve/client_error_rate"] == pytest.approx(np.mean((statuses >= 400) & (statuses < 500)))
    assert m["serve/share_429"] == pytest.approx(np.mean(statuses == 429))
    assert m["serve/tokens_per_s"] == pytest.approx(sum(r.completion_tokens for r in rows) / 300)


def test_histogram_quantile_as_prometheus():
    buckets = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (float("inf"), 50.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * 15 / 20)  # rank 25 in (0.1, 0.5]
    assert histogram_quantile(0.1, buckets) == pytest.approx(0.05)
    assert histogram_quantile(0.99, buckets) == 1.0  # in the +Inf bucket: the highest finite bound
    assert histogram_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def test_checked_in_prometheus_rules_and_dashboard_equal_a_fresh_export(tmp_path):
    cfg = make_cfg("monitor", tmp_path / "out" / "monitor" / "r", ["mode=export"])
    rules = load(OmegaConf.to_container(cfg.alerts, resolve=True))
    fresh = {"prometheus/alerts.yml": export.alert_rules(rules, cfg.prometheus.selector, cfg.window_s, cfg.interval_s),
             "grafana/lifecycle.json": export.dashboard(rules, cfg.prometheus.selector, cfg.interval_s)}
    for name, text in fresh.items():
        assert (ROOT / "deploy" / name).read_text() == text, (
            f"deploy/{name} is stale: regenerate with `lifecycle monitor mode=export export_dir=deploy`")
    board = json.loads(fresh["grafana/lifecycle.json"])
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    assert 'job="lifecycle"' in exprs and 'route!="/metrics"' in exprs
    latency = next(p for p in board["panels"] if p["title"].startswith("Latency"))
    steps = latency["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[1]["value"] == cfg.alerts.latency_p99_high.threshold
    text = fresh["prometheus/alerts.yml"]
    assert "#   token_drift: drift/token_js > 0.3" in text and "alert: token_drift" not in text
    assert "alert: error_rate_high" in text and "for: 120s" in text
