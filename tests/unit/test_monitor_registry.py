"""lifecycle.monitor.registry: versions and aliases, the lock two monitors contend for, the server switch."""
from __future__ import annotations

import json
import multiprocessing
import time

import pytest
from omegaconf import OmegaConf
from serve_rest_live import ADMIN_KEY, Live

from lifecycle.monitor import registry
from lifecycle.serve.testing import FakeEngine


def cfg(tmp_path, url=None):
    return OmegaConf.create({"registry": {
        "path": str(tmp_path / "registry" / "registry.json"), "lock_wait_s": 0.3, "serve_alias": "production",
        "server": {"url": url, "key_env": "TEST_ADMIN_KEY", "timeout_s": 10, "model_root": str(tmp_path)},
        "wandb": {"enabled": True, "entity": None, "project": "lifecycle"}}})


def adapter(tmp_path, name: str) -> str:
    (tmp_path / name).mkdir()
    (tmp_path / name / "adapter_model.safetensors").write_bytes(b"")  # the admin route's check; the fake never reads it
    return str(tmp_path / name)


def test_promote_and_rollback_move_the_aliases(tmp_path):
    c = cfg(tmp_path).registry
    v1 = registry.register(c, adapter(tmp_path, "a1"), "base")
    registry.promote(c, v1)
    v2 = registry.register(c, adapter(tmp_path, "a2"), "base")
    assert registry.load(c.path)["aliases"] == {"production": "v1", "previous": None, "candidate": "v2"}
    registry.promote(c, v2)
    assert registry.load(c.path)["aliases"] == {"production": "v2", "previous": "v1", "candidate": None}
    assert registry.rollback(cfg(tmp_path))["production"] == "v1"
    assert registry.load(c.path)["aliases"] == {"production": "v1", "previous": "v2", "candidate": None}
    assert registry.production(c)["path"].endswith("a1")
    with pytest.raises(registry.RegistryError, match="no version"):
        registry.promote(c, "v9")


def test_rollback_with_nothing_before_says_so(tmp_path):
    c = cfg(tmp_path)
    registry.promote(c.registry, registry.register(c.registry, adapter(tmp_path, "a1"), "base"))
    with pytest.raises(registry.RegistryError, match="nothing to roll back to"):
        registry.rollback(c)


def _hold_lock(path: str, held: multiprocessing.Event, release: multiprocessing.Event) -> None:
    with registry.locked(path, 5):
        held.set()
        release.wait(10)


def test_a_second_monitor_cannot_promote_while_the_first_holds_the_lock(tmp_path):
    c = cfg(tmp_path).registry
    v1 = registry.register(c, adapter(tmp_path, "a1"), "base")
    held, release = multiprocessing.Event(), multiprocessing.Event()
    other = multiprocessing.get_context("fork").Process(target=_hold_lock, args=(c.path, held, release))
    other.start()
    try:
        assert held.wait(10)
        started = time.monotonic()
        with pytest.raises(registry.RegistryError, match="locked by another monitor"):
            registry.promote(c, v1)
        assert time.monotonic() - started >= 0.3
        assert registry.load(c.path)["aliases"]["production"] is None
    finally:
        release.set()
        other.join(10)
    registry.promote(c, v1)  # free again
    assert registry.load(c.path)["aliases"]["production"] == "v1"


def _register_many(path: str, root: str, n: int) -> None:
    c = OmegaConf.create({"path": path, "lock_wait_s": 30})
    for i in range(n):
        registry.register(c, root, "base")


def test_concurrent_writers_lose_no_update(tmp_path):
    path = str(tmp_path / "registry.json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_register_many, args=(path, str(tmp_path), 15)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    reg = json.loads((tmp_path / "registry.json").read_text())
    assert sorted(reg["versions"], key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 46)]


def test_promotion_switches_the_server_and_an_unreachable_one_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_ADMIN_KEY", ADMIN_KEY)
    dead = cfg(tmp_path, url="http://127.0.0.1:9").registry
    v1 = registry.register(dead, adapter(tmp_path, "a1"), "base")
    with pytest.raises(registry.PromotionError, match="registry is unchanged"):
        registry.promote(dead, v1)
    assert registry.load(dead.path)["aliases"]["production"] is None
    with Live(FakeEngine(), model_root=str(tmp_path)) as live:
        c = cfg(tmp_path, url=live.url).registry
        registry.promote(c, v1)
        for i in (2, 3):
            registry.promote(c, registry.register(c, adapter(tmp_path, f"a{i}"), "base"))
        with live.client(ADMIN_KEY) as admin:
            assert admin.get("/admin/aliases").json()["aliases"] == {"production": "production-v3"}
            served = [m["id"] for m in admin.get("/v1/models").json()["data"]]
        assert "production-v2" in served and "production-v1" not in served  # previous stays, older goes
        assert registry.rollback(cfg(tmp_path, url=live.url))["served_name"] == "production-v2"
        with live.client(ADMIN_KEY) as admin:
            assert admin.get("/admin/aliases").json()["aliases"] == {"production": "production-v2"}


def test_monitor_mode_rollback_restores_previous_and_records_a_run(tmp_path):
    from conftest import make_cfg

    from lifecycle.monitor.stage import run

    out = tmp_path / "out"
    c = make_cfg("monitor", out / "monitor" / "rb", ["mode=rollback", "logger=none"]).registry
    registry.promote(c, registry.register(c, adapter(tmp_path, "a1"), "base"))
    registry.promote(c, registry.register(c, adapter(tmp_path, "a2"), "base"))
    result = run(make_cfg("monitor", out / "monitor" / "rb", ["mode=rollback", "logger=none"]))
    assert result["production"] == "v1" and registry.load(c.path)["aliases"]["production"] == "v1"
    assert (out / "monitor" / "rb" / "manifest.json").is_file()
