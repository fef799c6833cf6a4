"""POST /v1/feedback, the completion id in the usage log, mean_logprob always logged, and /admin/aliases: a
promotion that moves an alias under load drops no request."""
from __future__ import annotations

import threading
import time

import pytest
from serve_rest_live import ADMIN_KEY, Live
from sqlalchemy import create_engine, select

from lifecycle.serve.testing import FakeEngine
from lifecycle.serve.usage import UsageMeter, feedback_table, requests_table

CMPL = "/v1/completions"


@pytest.fixture()
def served(tmp_path):
    meter = UsageMeter(f"sqlite:///{tmp_path / 'usage.db'}", log_text=True)
    engine = FakeEngine(adapters=("production-v1", "production-v2"), token_delay=0.01)
    with Live(engine, meter, model_root=str(tmp_path), log_text=True) as live:
        yield live, meter
    meter.close()


def usage_rows(meter) -> list[dict]:
    meter.flush()
    with meter.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(requests_table))]


def test_the_completion_id_is_in_the_usage_row_with_a_mean_logprob(served):
    live, meter = served
    with live.client() as c:
        body = c.post(CMPL, json={"prompt": "hi", "max_tokens": 4}).json()
    assert "logprobs" not in body["choices"][0] or body["choices"][0]["logprobs"] is None  # not asked: not shown
    row = next(r for r in usage_rows(meter) if r["route"] == CMPL)
    assert row["request_id"] == body["id"] and row["mean_logprob"] is not None
    assert row["text"]["prompt"] == "hi"


def test_feedback_is_stored_only_for_the_keys_own_completions(served):
    live, meter = served
    with live.client() as c:
        rid = c.post(CMPL, json={"prompt": "hi", "max_tokens": 2}).json()["id"]
        ok = c.post("/v1/feedback", json={"id": rid, "rating": -1, "comment": "wrong"})
        stars = c.post("/v1/feedback", json={"request_id": rid, "rating": 4, "scale": "stars"})
        assert ok.status_code == 200 and stars.status_code == 200, ok.text
        assert c.post("/v1/feedback", json={"id": "cmpl-nope", "rating": 1}).status_code == 404
        assert c.post("/v1/feedback", json={"id": rid, "rating": 0}).status_code == 400
        assert c.post("/v1/feedback", json={"id": rid, "rating": 7, "scale": "stars"}).status_code == 400
        assert c.post("/v1/feedback", json={"rating": 1}).status_code == 400
    with live.client(ADMIN_KEY) as other:  # another key cannot rate (or probe) this key's completion
        assert other.post("/v1/feedback", json={"id": rid, "rating": 1}).status_code == 404
    with live.client(None) as anonymous:
        assert anonymous.post("/v1/feedback", json={"id": rid, "rating": 1}).status_code == 401
    with create_engine(meter.url).connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(feedback_table))]
    assert [(r["rating"], r["scale"], r["negative"]) for r in rows] == [(-1, "thumbs", True), (4, "stars", False)]
    assert rows[0]["comment"] == "wrong" and rows[0]["request_id"] == rid


def test_an_alias_resolves_per_request_and_guards_its_target(served):
    live, _ = served
    with live.client(ADMIN_KEY) as admin, live.client() as c:
        assert c.post("/admin/aliases", json={"alias": "production", "target": "production-v1"}).status_code == 403
        assert admin.post("/admin/aliases", json={"alias": "production", "target": "nope"}).status_code == 404
        assert admin.post("/admin/aliases", json={"alias": "fake", "target": "production-v1"}).status_code == 400
        moved = admin.post("/admin/aliases", json={"alias": "production", "target": "production-v1"}).json()
        assert moved == {"alias": "production", "target": "production-v1", "previous": None}
        assert "production" in [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert c.post(CMPL, json={"model": "production", "prompt": "x", "max_tokens": 2}).status_code == 200
        assert admin.delete("/admin/adapters/production-v1").status_code == 400  # aliased: unloading refused
        assert admin.get("/admin/aliases").json() == {"aliases": {"production": "production-v1"}}
        assert admin.delete("/admin/aliases/production").status_code == 200
        assert c.post(CMPL, json={"model": "production", "prompt": "x", "max_tokens": 2}).status_code == 404


def test_moving_the_alias_under_load_drops_no_request(served):
    live, _ = served
    results, stop = [], threading.Event()

    def client_loop():
        with live.client() as c:
            while not stop.is_set():
                r = c.post(CMPL, json={"model": "production", "prompt": "abc", "max_tokens": 8})
                results.append((r.status_code, r.json().get("model")))

    with live.client(ADMIN_KEY) as admin:
        admin.post("/admin/aliases", json={"alias": "production", "target": "production-v1"})
        threads = [threading.Thread(target=client_loop) for _ in range(3)]
        for t in threads:
            t.start()
        busy = []
        for target in ["production-v2", "production-v1"] * 10 + ["production-v1"]:  # switches while requests run
            time.sleep(0.03)
            busy.append(live.in_flight() > 1)  # the admin call itself is one
            assert admin.post("/admin/aliases", json={"alias": "production", "target": target}).status_code == 200
        admin.delete("/admin/adapters/production-v2")  # the old version goes once the alias has left it
        stop.set()
        for t in threads:
            t.join(30)
    assert sum(busy) >= 10, "the switches did not overlap running requests"
    assert len(results) > 20 and {s for s, _ in results} == {200}, results[:5]


def test_negative_control_unload_then_reload_under_one_name_does_drop_requests(served, tmp_path):
    """What the alias avoids: swapping an adapter in place leaves moments where its name is not served."""
    live, _ = served
    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "adapter_model.safetensors").write_bytes(b"")
    statuses, stop = [], threading.Event()

    def client_loop():
        with live.client() as c:
            while not stop.is_set():
                statuses.append(c.post(CMPL, json={"model": "production-v1", "prompt": "abc",
                                                   "max_tokens": 8}).status_code)

    with live.client(ADMIN_KEY) as admin:
        threads = [threading.Thread(target=client_loop) for _ in range(3)]
        for t in threads:
            t.start()
        for _ in range(20):
            time.sleep(0.03)
            admin.delete("/admin/adapters/production-v1")
            time.sleep(0.01)
            admin.post("/admin/adapters", json={"name": "production-v1", "path": "v3"})
        stop.set()
        for t in threads:
            t.join(30)
    assert 404 in statuses
