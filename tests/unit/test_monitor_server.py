"""lifecycle monitor against a real server (build_app + FakeEngine on a free port): the scraped /metrics give back
exactly the requests sent, the request log agrees, an idle window is "no traffic", a dead server is an error naming
its URL in one-shot mode and a logged failed tick in the daemon."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from serve_rest_live import KEY, Live, free_port, until

from conftest import ROOT, make_cfg
from lifecycle.errors import LifecycleError
from lifecycle.monitor.stage import run
from lifecycle.serve.usage import UsageMeter

CMPL = "/v1/completions"
KEY_ENV = "LIFECYCLE_MONITOR_TEST_KEY"


def monitor(tmp_path, url: str, *overrides: str, run_name: str = "r") -> dict:
    cfg = make_cfg("monitor", tmp_path / "out" / "monitor" / run_name,
                   [f"server.url={url}", f"server.key_env={KEY_ENV}", "db=null", *overrides])
    return run(cfg)


def send(live, ok: int, bad: int, unauthorized: int) -> None:
    """`ok` completions, `bad` 400s (max_tokens 0) and `unauthorized` 401s (no key)."""
    with live.client() as c:
        for _ in range(ok):
            assert c.post(CMPL, json={"prompt": "hi", "max_tokens": 4}).status_code == 200
        for _ in range(bad):
            assert c.post(CMPL, json={"prompt": "hi", "max_tokens": 0}).status_code == 400
    with live.client(key=None) as anonymous:
        for _ in range(unauthorized):
            assert anonymous.post(CMPL, json={"prompt": "hi"}).status_code == 401


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def test_scraped_counts_equal_what_was_sent(tmp_path):
    with Live() as live:
        send(live, ok=5, bad=2, unauthorized=1)
        first = monitor(tmp_path, live.url, run_name="a")
        second = monitor(tmp_path, live.url, run_name="b")  # its own scrapes are not traffic
    for m in (first, second):
        assert m["serve/requests"] == 8 and m["serve/requests_ok"] == 5
        assert m["serve/requests_client_error"] == 3 and m["serve/client_error_rate"] == pytest.approx(3 / 8)
        assert m["serve/error_rate"] == 0 and m["serve/share_429"] == 0
        assert m["serve/tokens_per_s"] * m["serve/window_s"] == pytest.approx(5 * 4)
        assert m["serve/up"] == 1 and m["serve/ready"] == 1 and m["serve/queue_depth"] == 0
        assert m["serve/rss_mb"] > 10 and m["serve/latency_ms_p50"] > 0
        assert "serve/gpu_memory_mb" not in m
    report = json.loads((tmp_path / "out" / "monitor" / "a" / "report.json").read_text())
    assert "GPU" in report["absent"]["serve/gpu_memory_mb"]
    manifest = json.loads((tmp_path / "out" / "monitor" / "a" / "manifest.json").read_text())
    assert manifest["stage"] == "monitor" and manifest["metrics"]["serve/requests"] == 8


def test_request_log_counts_and_idle_window(tmp_path):
    db = f"sqlite:///{tmp_path / 'usage.db'}"
    meter = UsageMeter(db)
    with Live(meter=meter) as live:
        send(live, ok=3, bad=1, unauthorized=0)
        meter.flush()
        m = monitor(tmp_path, live.url, f"db={db}", run_name="a")
        assert m["serve/requests"] == 4 and m["serve/requests_ok"] == 3 and m["serve/window_s"] == 300
        assert m["serve/client_error_rate"] == pytest.approx(1 / 4)
        time.sleep(1.2)
        idle = monitor(tmp_path, live.url, f"db={db}", "window_s=1", run_name="b")
    meter.close()
    assert idle["serve/requests"] == 0 and "serve/requests_per_s" not in idle and "serve/latency_ms_p99" not in idle
    report = json.loads((tmp_path / "out" / "monitor" / "b" / "report.json").read_text())
    assert report["absent"]["serve/latency_ms_p99"] == "no traffic in the window"
    assert "no traffic" in (tmp_path / "out" / "monitor" / "b" / "report.md").read_text()


def test_unreachable_server_one_shot_names_the_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(LifecycleError, match=f"{url}/metrics"):
        monitor(tmp_path, url)
    assert not (tmp_path / "out" / "monitor" / "r" / "manifest.json").exists()


def test_unreachable_server_daemon_logs_failed_ticks(tmp_path, caplog):
    url = f"http://127.0.0.1:{free_port()}"
    m = monitor(tmp_path, url, "mode=daemon", "interval_s=0.05", "max_ticks=3")
    assert m["monitor/ticks"] == 3 and m["monitor/failed_ticks"] == 3
    lines = [json.loads(x) for x in (tmp_path / "out" / "monitor" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [x["tick"] for x in lines] == [1, 2, 3] and all(url in x["errors"]["server"] for x in lines)
    assert all(x["serve/up"] == 0 for x in lines)
    assert "tick 2 failed" in caplog.text
    events = [json.loads(x) for x in (tmp_path / "out" / "monitor" / "r" / "alerts.jsonl").read_text().splitlines()]
    assert [(e["rule"], e["status"]) for e in events] == [("server_down", "firing")]  # window: 2 ticks


def test_daemon_rates_between_ticks(tmp_path):
    with Live() as live:
        send(live, ok=2, bad=0, unauthorized=0)
        cfg = make_cfg("monitor", tmp_path / "out" / "monitor" / "d",
                       [f"server.url={live.url}", f"server.key_env={KEY_ENV}", "db=null", "mode=daemon",
                        "interval_s=0.3", "max_ticks=2", "window_s=0.2"])
        m = run(cfg)
    lines = [json.loads(x) for x in (tmp_path / "out" / "monitor" / "d" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["serve/requests"] == 2  # since the server started
    assert lines[1]["serve/requests"] == 0 and lines[1]["serve/window_s"] < 1  # only between the ticks
    assert m["monitor/ticks"] == 2 and m["monitor/failed_ticks"] == 0


def test_daemon_stops_cleanly_on_sigterm(tmp_path):
    run_dir = tmp_path / "out" / "monitor" / "sig"
    proc = subprocess.Popen([sys.executable, "-m", "lifecycle.monitor", "mode=daemon", "interval_s=0.2",
                             f"server.url=http://127.0.0.1:{free_port()}", f"paths.output_root={tmp_path / 'out'}",
                             f"paths.run_dir={run_dir}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    history = run_dir / "metrics.jsonl"
    assert until(lambda: history.is_file() and len(history.read_text().splitlines()) >= 2, 30), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["metrics"]["monitor/ticks"] >= 2 and manifest["metrics"]["serve/up"] == 0
