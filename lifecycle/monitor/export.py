"""Prometheus alerting rules and a Grafana dashboard, generated from the same config and PromQL table the monitor
uses (`lifecycle monitor mode=export`); deploy/ holds a checked-in copy of the default generation."""
from __future__ import annotations

import json

import yaml

from lifecycle.monitor.promql import API, REQUESTS, expressions, sel
from lifecycle.monitor.rules import Rule
from lifecycle.monitor.traffic import quantile_key

RATE = "$__rate_interval"
COLORS = {"info": "blue", "warning": "orange", "critical": "red"}
# (title, unit, [(metric key, legend)]); a key of None is the per-outcome request rate.
PANELS = [
    ("Requests/s by outcome", "reqps", [(None, "{{outcome}}")]),
    ("Latency p50 / p99", "ms", [(quantile_key("latency", .5), "p50"), (quantile_key("latency", .99), "p99")]),
    ("Time to first token p50 / p99", "ms", [(quantile_key("ttft", .5), "p50"), (quantile_key("ttft", .99), "p99")]),
    ("Output tokens/s", "short", [("serve/tokens_per_s", "tokens/s")]),
    ("Queue depth / running", "short", [("serve/queue_depth", "queued"), ("serve/running", "running")]),
    ("Error rate", "percentunit", [("serve/error_rate", "5xx"), ("serve/client_error_rate", "4xx"),
                                   ("serve/share_429", "429")]),
    ("Process CPU", "percent", [("serve/cpu_percent", "cpu %")]),
    ("Resident memory", "mbytes", [("serve/rss_mb", "RSS MiB")]),
]


def on_server(rules: list[Rule]) -> list[Rule]:
    """The rules whose metric Prometheus has (the others are evaluated by the monitor alone)."""
    return [r for r in rules if r.metric in expressions("", "1s")]


def alert_rules(rules: list[Rule], selector: str, window_s: float, interval_s: float) -> str:
    """alerts.yml: one Prometheus alert per rule on a server metric; the others listed as comments."""
    table = expressions(selector, f"{int(window_s)}s")
    mapped = on_server(rules)
    lines = ["# Prometheus alerting rules for `lifecycle serve`, generated from conf/monitor.yaml's alerts by",
             "# `lifecycle monitor mode=export` (regenerate, do not edit). Check: promtool check rules alerts.yml",
             f"# Rates over {int(window_s)}s (window_s); a window of n ticks becomes for: (n - 1) x {interval_s:g}s "
             "(interval_s)."]
    only = [r for r in rules if r not in mapped]
    if only:
        lines.append("# Evaluated only by `lifecycle monitor` (drift and quality are not Prometheus metrics):")
        lines += [f"#   {r.name}: {r.describe()} [{r.severity}, action {r.action}]" for r in only]
    groups = {"groups": [{"name": "lifecycle", "rules": [_alert(r, table[r.metric], interval_s) for r in mapped]}]}
    return "\n".join(lines) + "\n" + yaml.safe_dump(groups, sort_keys=False, width=1000)


def _alert(rule: Rule, promql: str, interval_s: float) -> dict:
    seconds = rule.seconds if rule.seconds is not None else (rule.ticks - 1) * interval_s
    return {"alert": rule.name, "expr": f"({promql}) {rule.op} {rule.threshold:g}", "for": f"{seconds:g}s",
            "labels": {"severity": rule.severity, "action": rule.action},
            "annotations": {"summary": f"{rule.name}: {rule.describe()}",
                            "description": f"{rule.metric} is {{{{ $value }}}} ({rule.op} {rule.threshold:g})"}}


def dashboard(rules: list[Rule], selector: str, interval_s: float) -> str:
    """A Grafana dashboard (JSON) of the server's metrics, with each alert rule's threshold drawn on its panel."""
    table = expressions(selector, RATE)
    panels = []
    for i, (title, unit, series) in enumerate(PANELS):
        targets = [{"refId": chr(65 + j), "legendFormat": legend,
                    "expr": table[key] if key else f"sum by (outcome) (rate({REQUESTS}{sel(selector, API)}[{RATE}]))"}
                   for j, (key, legend) in enumerate(series)]
        keys = {key for key, _ in series}
        steps = [{"color": COLORS[r.severity], "value": r.threshold} for r in rules if r.metric in keys]
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title, "gridPos": {"x": 12 * (i % 2), "y": 8 * (i // 2),
                                                                          "w": 12, "h": 8},
            "datasource": {"type": "prometheus", "uid": "${datasource}"}, "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit, "custom": {"thresholdsStyle": {"mode": "line" if steps
                                                                                        else "off"}},
                                         "thresholds": {"mode": "absolute", "steps": [
                                             {"color": "green", "value": None},
                                             *sorted(steps, key=lambda s: s["value"])]}},
                            "overrides": []}})
    board = {"uid": "lifecycle-serve", "title": "lifecycle serve", "tags": ["lifecycle"], "schemaVersion": 39,
             "time": {"from": "now-1h", "to": "now"}, "refresh": f"{int(interval_s)}s", "editable": True,
             "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                      "query": "prometheus"}]},
             "panels": panels}
    return json.dumps(board, indent=2) + "\n"
