"""The REST front end against bad input, bad keys, big bodies, CORS, traversal and start-up (TESTPLAN serving
cases 1-11, 18, 22), over real HTTP to a uvicorn server around the fake engine."""
from __future__ import annotations

import logging
import os
import pickle

import pytest
from serve_rest_live import ADMIN_KEY, KEY, Live, make_app, until
from starlette.testclient import TestClient

from lifecycle.errors import ConfigError
from lifecycle.serve.auth import KeyStore
from lifecycle.serve.metrics import ServeMetrics
from lifecycle.serve.protocol import ContextTooLong, InvalidPrompt, ModelNotFound, NotReady, Overloaded
from lifecycle.serve.rest import RestSettings, build_app
from lifecycle.serve.testing import FakeEngine

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def live():
    with Live(FakeEngine(adapters=("v1.2-real",))) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    with live.client() as c:
        yield c


def error_of(response, status: int) -> dict:
    """The OpenAI error object of a response that must have `status`."""
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize("body", ["nope", "[1]", "42", "null", '{"prompt": ', "\xff"])
def test_body_that_is_not_a_json_object_is_400(client, body):
    error_of(client.post(CMPL, content=body.encode("latin-1")), 400)


@pytest.mark.parametrize("route,body,param", [
    (CMPL, {"prompt": "x", "max_tokens": "10"}, "max_tokens"),
    (CMPL, {"prompt": "x", "temperature": "hot"}, "temperature"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CMPL, {"prompt": "x", "stream": "yes"}, "stream"),
    (CMPL, {"prompt": 5}, "prompt"),
    (CMPL, {"prompt": [1, "a"]}, "prompt"),
    (CHAT, {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
])
def test_wrong_types_are_400_naming_param(client, route, body, param):
    assert error_of(client.post(route, json=body), 400)["param"] == param


@pytest.mark.parametrize("field,value,limit", [
    ("max_tokens", 0, "128"), ("max_tokens", -1, "128"), ("max_tokens", 129, "128"),
    ("temperature", -0.1, "0"), ("top_p", 0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"), ("n", 9, "8"),
    ("stop", list("abcdefghijklmnopq"), "16"), ("logprobs", 21, "20"),
])
def test_out_of_range_is_400_naming_the_limit(client, field, value, limit):
    err = error_of(client.post(CMPL, json={"prompt": "x", field: value}), 400)
    assert err["param"] == field and limit in err["message"]


def test_context_overflow_names_both_numbers_and_default_is_clamped(client):
    err = error_of(client.post(CMPL, json={"prompt": "a" * 300}), 400)  # fake context: 256
    assert "300" in err["message"] and "256" in err["message"]
    err = error_of(client.post(CMPL, json={"prompt": "a" * 200, "max_tokens": 100}), 400)
    assert all(s in err["message"] for s in ("200", "100", "256"))
    clamped = client.post(CMPL, json={"prompt": "a" * 252}).json()  # default 8 tokens, 4 left
    assert clamped["usage"]["completion_tokens"] == 4 and clamped["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("route,body", [
    (CMPL, {"prompt": ""}), (CMPL, {"prompt": []}), (CMPL, {"prompt": [[]]}), (CMPL, {"prompt": ["a", ""]}),
    (CHAT, {"messages": []}), (CHAT, {"messages": [{"role": "user"}]}),
])
def test_empty_prompt_or_messages_is_400(client, route, body):
    error_of(client.post(route, json=body), 400)


@pytest.mark.parametrize("name,status", [
    ("../x", 400), ("/etc/passwd", 400), ("a/../b", 400), ("%2e%2e%2f", 400), ("..", 400),
    ("v1.2", 404), ("..x", 404), ("nope", 404),
])
def test_model_names_traversal_400_unknown_404(client, name, status):
    for route, body in ((CMPL, {"prompt": "x"}), (CHAT, {"messages": HI})):
        err = error_of(client.post(route, json={**body, "model": name}), status)
        assert err["code"] == ("model_not_found" if status == 404 else "invalid_model_name")
    assert client.post(CMPL, json={"prompt": "x", "model": "v1.2-real"}).status_code == 200


@pytest.mark.parametrize("raw,status", [("%2e%2e%2fetc%2fpasswd", 400), ("..%2Fx", 400), ("v1.2", 404),
                                        ("..x", 404), ("fake", 200)])
def test_model_names_in_paths(live, client, raw, status):
    assert client.get(f"/v1/models/{raw}").status_code == status
    if status != 200:
        with live.client(key=ADMIN_KEY) as admin:
            assert admin.delete(f"/admin/adapters/{raw}").status_code == status


@pytest.fixture
def model_root(tmp_path):
    root = tmp_path / "models"
    good = root / "adapters" / "good"
    good.mkdir(parents=True)
    (good / "adapter_model.safetensors").write_bytes(b"\0" * 8)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_model.safetensors").write_bytes(b"\0" * 8)
    (root / "escape").symlink_to(outside)
    return root


class Payload:
    """A pickle that would create a marker file if anything ever unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_admin_adapters_load_only_safe_paths_inside_the_root(model_root, tmp_path):
    evil = model_root / "evil"
    evil.mkdir()
    marker = tmp_path / "PWNED"
    (evil / "adapter_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    with Live(model_root=str(model_root)) as live, live.client(key=ADMIN_KEY) as admin, live.client() as user:
        post = lambda name, path: admin.post("/admin/adapters", json={"name": name, "path": path})  # noqa: E731
        for path in ("../outside", str(model_root / "adapters/good"), "%2e%2e%2foutside", "escape", "a/../../x"):
            assert error_of(post("x", path), 400)["param"] == "path", path
        assert error_of(post("x", "adapters/missing"), 404)["code"] == "model_not_found"
        assert "pickle" in error_of(post("x", "evil"), 400)["message"]  # case 8: never unpickled
        assert error_of(post("../x", "adapters/good"), 400)["param"] == "name"
        assert error_of(user.post("/admin/adapters", json={"name": "x", "path": "adapters/good"}), 403)
        assert post("mine", "adapters/good").json()["id"] == "mine"
        assert user.post(CMPL, json={"prompt": "x", "model": "mine"}).status_code == 200
        assert admin.delete("/admin/adapters/mine").status_code == 200
        assert error_of(admin.delete("/admin/adapters/mine"), 404)["code"] == "model_not_found"
    assert not marker.exists()


def route_calls(app):
    """(method, path) for every route the app has, path parameters filled in."""
    for route in app.routes:
        path = route.path.replace("{model:path}", "fake").replace("{name:path}", "x")
        for method in sorted(route.methods - {"HEAD"}):
            yield method, path


def test_every_route_but_the_probes_needs_a_key(live):
    calls = list(route_calls(live.app)) + [("GET", "/no/such/route"), ("POST", "/v1/nope")]
    assert len(calls) >= 10
    bad_headers = [{}, {"authorization": "Bearer wrong"}, {"authorization": f"Bearer {KEY.upper()}"},
                   {"authorization": f"Basic {KEY}"}, {"authorization": "Bearer"}, {"authorization": KEY}]
    with live.client(key=None) as anon:
        for method, path in calls:
            for headers in bad_headers:
                r = anon.request(method, path, headers=headers, json={})
                if path in ("/health", "/ready"):
                    assert r.status_code == 200, (method, path)
                else:
                    assert error_of(r, 401)["type"] == "authentication_error", (method, path, headers)


def test_no_keys_configured_denies_everything():
    app = build_app(FakeEngine(), KeyStore({}), None, ServeMetrics(), RestSettings())
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        for header in ("Bearer ", "Bearer anything", f"Bearer {KEY}"):
            assert error_of(c.get("/v1/models", headers={"authorization": header}), 401)


def test_body_over_the_limit_is_413_with_and_without_content_length(client):
    big = b'{"prompt": "' + b"a" * 100_000 + b'"}'  # limit 64 KiB
    assert error_of(client.post(CMPL, content=big), 413)["code"] == "request_too_large"

    def chunked():
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]
    assert error_of(client.post(CMPL, content=chunked()), 413)["code"] == "request_too_large"
    assert client.post(CMPL, json={"prompt": "small"}).status_code == 200


def test_cors_allows_only_listed_origins_never_star():
    ok, bad = "https://ok.example", "https://evil.example"
    with Live(cors_origins=[ok]) as live, live.client(key=None) as c:
        pre = {"access-control-request-method": "POST", "access-control-request-headers": "authorization"}
        allowed = c.options(CMPL, headers={"origin": ok, **pre})
        assert allowed.headers["access-control-allow-origin"] == ok
        assert "access-control-allow-credentials" not in allowed.headers
        denied = c.options(CMPL, headers={"origin": bad, **pre})
        assert "access-control-allow-origin" not in denied.headers
        simple = c.get("/health", headers={"origin": bad})
        assert "access-control-allow-origin" not in simple.headers
    with pytest.raises(ConfigError):
        make_app(cors_origins=["*"])


def test_health_early_ready_after_load_and_requests_503_while_loading():
    with Live(FakeEngine(load_delay=1.0), wait_ready=False) as live, live.client() as c:
        assert c.get("/health").status_code == 200
        assert error_of(c.get("/ready"), 503)["code"] == "loading"
        assert error_of(c.post(CMPL, json={"prompt": "x"}), 503)["code"] == "not_ready"
        assert until(lambda: c.get("/ready").status_code == 200, 5)
        assert c.post(CMPL, json={"prompt": "x"}).status_code == 200
        assert live.counters(CMPL) == {"unavailable": 1, "ok": 1}


class CorruptEngine(FakeEngine):
    async def start(self):
        raise ValueError("model.safetensors: truncated (header announces 4096 bytes, the file has 100)")


@pytest.mark.parametrize("engine", [FakeEngine(fail_load=True), CorruptEngine()], ids=["fail_load", "corrupt"])
def test_failed_load_keeps_ready_503_and_is_logged(engine, caplog):
    caplog.set_level(logging.ERROR, logger="lifecycle.serve.rest")
    with Live(engine, wait_ready=False) as live, live.client() as c:
        assert until(lambda: live.app.state.serve.load_error is not None, 5)
        for _ in range(3):
            err = error_of(c.get("/ready"), 503)
            assert err["code"] == "load_failed" and str(live.app.state.serve.load_error) in err["message"]
        assert c.get("/health").status_code == 200
        assert error_of(c.post(CMPL, json={"prompt": "x"}), 503)
    assert "failed to load" in caplog.text
    if isinstance(engine, CorruptEngine):
        assert "model.safetensors" in caplog.text and "truncated" in caplog.text


class RefusingEngine(FakeEngine):
    """Raises `refuse` from the first step of every job, as a real engine's admission would."""
    refuse: Exception | None = None

    async def generate(self, request):
        if self.refuse is not None:
            raise self.refuse
        async for event in super().generate(request):
            yield event


@pytest.mark.parametrize("refusal,status,code", [
    (ModelNotFound("no model 'x'"), 404, "model_not_found"),
    (ContextTooLong("prompt (300 tokens) + max_tokens (16) is over 256"), 400, "context_length_exceeded"),
    (InvalidPrompt("token id 99999 is outside the vocabulary"), 400, "invalid_prompt"),
    (Overloaded("full", retry_after=2.5), 429, "overloaded"),
    (NotReady("draining"), 503, "not_ready"),
])
def test_engine_refusals_map_to_statuses_for_json_and_streams(refusal, status, code):
    engine = RefusingEngine()
    with Live(engine) as live, live.client() as c:
        engine.refuse = refusal
        for stream in (False, True):
            r = c.post(CMPL, json={"prompt": "x", "stream": stream})
            assert error_of(r, status)["code"] == code and str(refusal) in r.json()["error"]["message"]
            assert status != 429 or r.headers["retry-after"] == "3"
        assert c.get("/health").status_code == 200 and idle_after(engine)


def idle_after(engine) -> bool:
    return until(lambda: engine.stats() == {"running": 0, "queued": 0}, 1)


def test_no_chat_template_is_400_not_500():
    with Live(FakeEngine(chat_template=False)) as live, live.client() as c:
        err = error_of(c.post(CHAT, json={"messages": HI}), 400)
        assert err["code"] == "no_chat_template" and "chat template" in err["message"]
        assert c.post(CMPL, json={"prompt": "x"}).status_code == 200
