"""A real uvicorn server around build_app + FakeEngine on 127.0.0.1 (a free port) in a background thread, for the
REST tests that need real HTTP: streaming, disconnects, timeouts, load."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from lifecycle.serve.auth import KeyStore, digest
from lifecycle.serve.metrics import ServeMetrics
from lifecycle.serve.rest import RestSettings, build_app
from lifecycle.serve.runner import make_server
from lifecycle.serve.testing import FakeEngine

KEY, ADMIN_KEY = "sk-test-user-NOT-A-REAL-KEY", "sk-test-admin-NOT-A-REAL-KEY"  # visibly fake


def keystore() -> KeyStore:
    return KeyStore({digest(KEY): "tester", digest(ADMIN_KEY): "ops"})


def settings(**overrides) -> RestSettings:
    base = dict(max_body_bytes=64 * 1024, max_tokens_cap=128, default_max_tokens=8, request_timeout_s=10,
                admin_key_ids=["ops"], drain_timeout_s=5)
    return RestSettings(**{**base, **overrides})


def make_app(engine=None, meter=None, **overrides):
    """(app, metrics, engine) with the test keys."""
    engine = engine or FakeEngine()
    metrics = ServeMetrics(stats=engine.stats, ready=lambda: engine.ready)
    return build_app(engine, keystore(), meter, metrics, settings(**overrides)), metrics, engine


class Live:
    """Start with `with Live(...) as live:`; `live.url`, `live.client()`, `live.counters()`."""

    def __init__(self, engine=None, meter=None, wait_ready=True, **overrides):
        self.app, self.metrics, self.engine = make_app(engine, meter, **overrides)
        self.server = make_server(self.app, "127.0.0.1", 0, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.wait_ready = wait_ready

    def __enter__(self) -> "Live":
        self.thread.start()
        _until(lambda: self.server.started, 10)
        self.url = f"http://127.0.0.1:{self.server.port}"
        if self.wait_ready:
            _until(lambda: self.engine.ready, 10)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def client(self, key: str | None = KEY, **kw) -> httpx.Client:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 10), **kw)

    def counters(self, route: str | None = None) -> dict[str, float]:
        """lifecycle_requests_total by outcome (for `route`, or all routes), read from the registry."""
        out: dict[str, float] = {}
        for metric in self.metrics.requests.collect():
            for s in metric.samples:
                if s.name.endswith("_total") and (route is None or s.labels["route"] == route):
                    out[s.labels["outcome"]] = out.get(s.labels["outcome"], 0) + s.value
        return out

    def in_flight(self) -> float:
        return self.metrics.in_flight.labels("rest")._value.get()


def _until(condition, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


def until(condition, timeout: float = 5.0) -> bool:
    """Poll `condition` until true; False after `timeout`."""
    with contextlib.suppress(TimeoutError):
        _until(condition, timeout)
        return True
    return False


def events(lines) -> list:
    """Parsed SSE payloads of a stream ("[DONE]" kept as a string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def idle(engine) -> bool:
    return engine.stats() == {"running": 0, "queued": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server_process(tmp_path: Path, token_delay: float, drain: float = 5.0):
    """tests/unit/serve_rest_proc.py as a child process; returns (process, base url, counters file)."""
    port, out = free_port(), tmp_path / "counters.json"
    script = Path(__file__).with_name("serve_rest_proc.py")
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(out), str(token_delay), str(drain)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    assert until(lambda: _ready(url), 30), "server did not come up"
    return proc, url, out


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
