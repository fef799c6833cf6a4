"""A real Prometheus (Debian's 2.42, a plain process on loopback) scrapes a real server with bearer auth every
second and loads the generated alerting rules; promtool accepts them; a counter read back through the query API
equals what was sent, and the monitor's Prometheus mode reports the same traffic and process as the server."""
from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time

import httpx
import pytest
import yaml

from conftest import make_cfg
from lifecycle.monitor.promql import query
from lifecycle.monitor.stage import run
from lifecycle.serve.auth import KeyStore, digest
from lifecycle.serve.metrics import ServeMetrics
from lifecycle.serve.rest import RestSettings, build_app
from lifecycle.serve.runner import make_server
from lifecycle.serve.testing import FakeEngine

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="the prometheus binary is absent: `make setup` installs it (apt-get install prometheus)")]
KEY = "sk-test-monitor-NOT-A-REAL-KEY"
SENT = 'sum(lifecycle_requests_total{job="lifecycle",route!="/metrics"})'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(condition, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def server():
    engine = FakeEngine()
    app = build_app(engine, KeyStore({digest(KEY): "prometheus"}), None,
                    ServeMetrics(engine.stats, lambda: engine.ready), RestSettings(default_max_tokens=4))
    uvicorn_server = make_server(app, "127.0.0.1", 0, log_level="warning")
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    until(lambda: uvicorn_server.started and engine.ready, 10, "the server")
    yield f"127.0.0.1:{uvicorn_server.port}"
    uvicorn_server.should_exit = True
    thread.join(10)


def send(target: str, ok: int, bad: int) -> None:
    with httpx.Client(base_url=f"http://{target}", headers={"authorization": f"Bearer {KEY}"}) as c:
        for _ in range(ok):
            assert c.post("/v1/completions", json={"prompt": "hi"}).status_code == 200
        for _ in range(bad):
            assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 0}).status_code == 400


@pytest.fixture
def prometheus(tmp_path, server):
    export = run(make_cfg("monitor", tmp_path / "out" / "monitor" / "export", ["mode=export"]))
    rules = tmp_path / "out" / "monitor" / "export" / "prometheus" / "alerts.yml"
    checked = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert checked.returncode == 0 and f"{export['monitor/prometheus_rules']} rules found" in checked.stdout, checked
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "lifecycle", "static_configs": [{"targets": [server]}],
                            "authorization": {"credentials": KEY}}]}))
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--web.listen-address={url[7:]}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: _ready(url) or proc.poll() is not None, 15, "Prometheus to start")
        assert proc.poll() is None, proc.stderr.read()
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_prometheus_scrapes_with_auth_and_the_monitor_reads_it_back(tmp_path, server, prometheus):
    send(server, ok=1, bad=1)  # both outcome series exist before the window's traffic (increase() needs two points)
    until(lambda: query(prometheus, SENT, 5) == 2, 20, "the first scrape")
    send(server, ok=4, bad=2)
    until(lambda: query(prometheus, SENT, 5) == 8, 10, "the counter to reach 8")
    assert query(prometheus, 'up{job="lifecycle"}', 5) == 1  # bearer auth accepted
    groups = httpx.get(f"{prometheus}/api/v1/rules").json()["data"]["groups"]
    assert [g["name"] for g in groups] == ["lifecycle"] and len(groups[0]["rules"]) >= 5
    time.sleep(1.5)  # one more scrape after the last request, so increase() sees the new value twice
    cfg = make_cfg("monitor", tmp_path / "out" / "monitor" / "prom",
                   [f"prometheus.url={prometheus}", "db=null", "window_s=60"])
    m = run(cfg)
    assert m["serve/up"] == 1 and m["serve/ready"] == 1 and m["serve/queue_depth"] == 0
    assert 4 <= m["serve/requests_ok"] <= 8 and 1.5 <= m["serve/requests_client_error"] <= 4  # increase() extrapolates
    assert m["serve/client_error_rate"] == pytest.approx(2 / 6, abs=0.1) and m["serve/error_rate"] == 0
    assert m["serve/latency_ms_p50"] > 0 and m["serve/rss_mb"] > 10 and m["serve/cpu_percent"] >= 0
    rss = query(prometheus, 'process_resident_memory_bytes{job="lifecycle"}', 5) / 2**20
    assert m["serve/rss_mb"] == pytest.approx(rss, rel=0.2)
