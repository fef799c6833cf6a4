"""Where alerts go (a webhook on a local http.server, a dead or slow webhook only logged, W&B offline as metrics and
a table) and the monitor's hooks: a missing corpus profile, drift scores evaluated like any metric, a firing
`action: retrain` rule calling retrain.run, and a retrain module that is not there."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from omegaconf import open_dict
from serve_rest_live import KEY, Live, free_port

from conftest import make_cfg
from lifecycle import tracking
from lifecycle.errors import DataError
from lifecycle.monitor.notify import Notifier
from lifecycle.monitor.stage import run
from lifecycle.serve.usage import UsageMeter, UsageRecord, request_stats

EVENT = {"status": "firing", "rule": "r", "metric": "serve/x", "value": 3.0, "op": ">", "threshold": 1.0,
         "condition": "serve/x > 1 for 1 tick(s)", "severity": "critical", "action": "none", "ts": 1.0, "since": 1.0}


class Hook(BaseHTTPRequestHandler):
    received: list = []
    delay = 0.0

    def do_POST(self):
        time.sleep(self.delay)
        self.received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    server = HTTPServer(("127.0.0.1", 0), Hook)
    Hook.received, Hook.delay = [], 0.0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/alerts", Hook
    server.shutdown()


class Recorder:
    """A logger with WandbLogger's log_metrics/log_table, recording the calls."""

    def __init__(self):
        self.metrics, self.tables = [], []

    def log_metrics(self, metrics, step=None):
        self.metrics.append(metrics)

    def log_table(self, key, columns, data):
        self.tables.append((key, columns, data))


def test_webhook_gets_the_event_as_json(webhook):
    url, hook = webhook
    Notifier(url, 2.0, run_dir="/runs/x").send(EVENT)
    assert hook.received == [{**EVENT, "run_dir": "/runs/x"}]


def test_dead_or_slow_webhook_is_logged_not_raised(webhook, caplog):
    url, hook = webhook
    hook.delay = 1.0
    started = time.monotonic()
    Notifier(url, 0.2).send(EVENT)
    Notifier(f"http://127.0.0.1:{free_port()}/alerts", 0.2).send(EVENT)
    assert time.monotonic() - started < 1.0
    assert caplog.text.count("alert webhook") == 2 and "ReadTimeout" in caplog.text and "ConnectError" in caplog.text


def test_offline_wandb_gets_metrics_and_a_table_not_an_alert():
    logger = Recorder()
    notifier = Notifier(None, 1.0, logger)
    notifier.send(EVENT)
    notifier.send({**EVENT, "status": "resolved", "ts": 2.0})
    notifier.finish()
    assert logger.metrics == [{"alert/r": 1.0}, {"alert/r": 0.0}]
    (key, columns, data), = logger.tables
    assert key == "alerts" and [row[columns.index("status")] for row in data] == ["firing", "resolved"]
    assert tracking.alert(logger, "t", "x", "critical") is False  # not an online W&B run


def test_missing_profile_is_a_clear_error(tmp_path):
    cfg = make_cfg("monitor", tmp_path / "out" / "monitor" / "r",
                   ["drift.enabled=true", f"drift.profile={tmp_path}/nope/profile.json"])
    with pytest.raises(DataError, match=f"drift.profile={tmp_path}/nope/profile.json.*lifecycle data"):
        run(cfg)


def logged_traffic(tmp_path) -> tuple[str, str]:
    """A request log of 5 generations with statistics, and a corpus profile that never used their tokens."""
    db, profile = f"sqlite:///{tmp_path / 'usage.db'}", tmp_path / "profile.json"
    from lifecycle.data.profile import LENGTH_BINS

    hist = [0] * (len(LENGTH_BINS) - 1)
    hist[2] = 10
    profile.write_text(json.dumps({"token_frequencies": [100] * 10 + [0] * 246, "length_bins": LENGTH_BINS,
                                   "doc_tokens_hist": hist}))
    meter = UsageMeter(db)
    for i in range(5):
        meter.record(UsageRecord("k", "m", "rest", "/v1/completions", 200, prompt_tokens=3, completion_tokens=1,
                                 latency_ms=5.0, stats=request_stats("abc", "d", [200, 201, 202], [203]),
                                 request_id=f"cmpl-{i}"))
    meter.close()
    return db, str(profile)


def drift_cfg(tmp_path, url: str, db: str, profile: str):
    cfg = make_cfg("monitor", tmp_path / "out" / "monitor" / "r",
                   [f"server.url={url}", "server.key_env=LIFECYCLE_MONITOR_TEST_KEY", f"db={db}",
                    "drift.enabled=true", f"drift.profile={profile}"])
    with open_dict(cfg):
        cfg.alerts = {"drifted": {"metric": "drift/token_js", "op": ">", "threshold": 0.5, "window": 1,
                                  "severity": "warning", "action": "retrain"}}
    return cfg


def test_drift_scores_fire_a_retrain_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFECYCLE_MONITOR_TEST_KEY", KEY)
    db, profile = logged_traffic(tmp_path)
    calls = []
    monkeypatch.setattr("lifecycle.monitor.retrain.run", lambda cfg, alert: calls.append(alert) or {"outcome": "x"})
    with Live() as live:
        metrics = run(drift_cfg(tmp_path, live.url, db, profile))
    assert metrics["drift/token_js"] == pytest.approx(1.0) and metrics["serve/requests"] == 5
    assert [(c["rule"], c["value"]) for c in calls] == [("drifted", metrics["drift/token_js"])]
    events = [json.loads(x) for x in (tmp_path / "out/monitor/r/alerts.jsonl").read_text().splitlines()]
    assert events[0]["retrain"] == {"outcome": "x"}


def test_retrain_module_missing_is_logged_not_a_crash(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LIFECYCLE_MONITOR_TEST_KEY", KEY)
    monkeypatch.setitem(__import__("sys").modules, "lifecycle.monitor.retrain", None)
    db, profile = logged_traffic(tmp_path)
    with Live() as live:
        metrics = run(drift_cfg(tmp_path, live.url, db, profile))
    assert metrics["monitor/alerts_fired"] == 1
    event = json.loads((tmp_path / "out/monitor/r/alerts.jsonl").read_text().splitlines()[0])
    assert "lifecycle.monitor.retrain is not in this version" in event["retrain"]["error"]
