"""Model versions and the aliases `production`, `previous` and `candidate`, in one local JSON file.

    registry.json  {"versions": {"v1": {path, base, run, eval, metrics, created}}, "aliases": {alias: version},
                    "history": [{ts, action, from, to}]}

Every change happens under an exclusive `fcntl` lock on registry.json.lock and is written with an atomic rename, so
two monitors never promote at once and a crash never leaves half a file. Promotion and rollback move the running
server first (the new adapter is loaded under its versioned name `<alias>-<version>`, then the server's alias is
pointed at it: lifecycle.serve.aliases, no request dropped) and record the change only once the server has it; a
server that cannot be reached leaves the registry and production untouched. Versions neither `production` nor
`previous` are unloaded after the switch. Mirrored to W&B artifact aliases when online (`registry.wandb`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from lifecycle import artifacts
from lifecycle.errors import LifecycleError

ALIASES = ("production", "previous", "candidate")


class RegistryError(LifecycleError):
    """The registry cannot do what was asked (busy, no such version, nothing to roll back to)."""


class PromotionError(LifecycleError):
    """The server could not be switched; the registry and the served production model are unchanged."""


def load(path: Path) -> dict:
    """The registry, or an empty one."""
    path = Path(path)
    if not path.is_file():
        return {"versions": {}, "aliases": {a: None for a in ALIASES}, "history": []}
    return json.loads(path.read_text())


@contextlib.contextmanager
def locked(path: Path, wait_s: float):
    """Hold the registry's exclusive lock (RegistryBusy after `wait_s`); yields the registry to edit."""
    lock_path = Path(path).with_suffix(".json.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RegistryError(f"{path} is locked by another monitor (a promotion or rollback is under "
                                        f"way); waited {wait_s} s. Try again when it has finished") from None
                time.sleep(0.05)
        try:
            yield load(path)
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def register(cfg_registry, path: str, base: str | None, run: str | None = None, eval_run: str | None = None,
             metrics: dict | None = None) -> str:
    """Add a model version (an adapter directory on `base`, or a model directory); it becomes `candidate`."""
    with locked(cfg_registry.path, cfg_registry.lock_wait_s) as reg:
        version = f"v{len(reg['versions']) + 1}"
        reg["versions"][version] = {"path": str(Path(path).resolve()), "base": base, "run": run, "eval": eval_run,
                                    "metrics": metrics or {}, "created": time.time()}
        _move(reg, "candidate", version, "register")
        artifacts.write_json(Path(cfg_registry.path), reg)
    return version


def promote(cfg_registry, version: str) -> dict:
    """Serve `version` as production (the old one becomes `previous`); the server first, then the registry."""
    with locked(cfg_registry.path, cfg_registry.lock_wait_s) as reg:
        if version not in reg["versions"]:
            raise RegistryError(f"no version {version!r} in {cfg_registry.path}; known: {sorted(reg['versions'])}")
        old = reg["aliases"]["production"]
        switched = _switch(cfg_registry, reg, version, keep={version, old})
        if old and old != version:
            _move(reg, "previous", old, "promote")
        _move(reg, "production", version, "promote")
        if reg["aliases"]["candidate"] == version:
            reg["aliases"]["candidate"] = None
        artifacts.write_json(Path(cfg_registry.path), reg)
    _mirror_wandb(cfg_registry, reg)
    return {"production": version, "previous": reg["aliases"]["previous"], **switched}


def rollback(cfg) -> dict:
    """Serve `previous` again; the rolled-back version becomes `previous` (so a second rollback undoes this one)."""
    cfg_registry = cfg.registry
    with locked(cfg_registry.path, cfg_registry.lock_wait_s) as reg:
        current, previous = reg["aliases"]["production"], reg["aliases"]["previous"]
        if previous is None:
            raise RegistryError(f"nothing to roll back to: {cfg_registry.path} has no `previous` version "
                                f"(production is {current})")
        switched = _switch(cfg_registry, reg, previous, keep={previous, current})
        _move(reg, "production", previous, "rollback")
        _move(reg, "previous", current, "rollback")
        artifacts.write_json(Path(cfg_registry.path), reg)
    _mirror_wandb(cfg_registry, reg)
    return {"production": previous, "previous": current, **switched}


def production(cfg_registry) -> dict | None:
    """The production version's record ({version, path, base, ...}), or None before the first promotion."""
    reg = load(cfg_registry.path)
    version = reg["aliases"]["production"]
    return None if version is None else {"version": version, **reg["versions"][version],
                                         "since": _promoted_at(reg, version)}


def served_name(cfg_registry, version: str) -> str:
    return f"{cfg_registry.serve_alias}-{version}"


def _move(reg: dict, alias: str, version: str | None, action: str) -> None:
    reg["history"].append({"ts": time.time(), "action": action, "alias": alias, "from": reg["aliases"][alias],
                           "to": version})
    reg["aliases"][alias] = version


def _promoted_at(reg: dict, version: str) -> float:
    moves = [h["ts"] for h in reg["history"] if h["alias"] == "production" and h["to"] == version]
    return moves[-1] if moves else reg["versions"][version]["created"]


def _switch(cfg_registry, reg: dict, version: str, keep: set) -> dict:
    """Load `version` on the server if needed, point the serving alias at it, unload versions not in `keep`."""
    server = cfg_registry.server
    if not server.url:
        return {"server": None}
    import httpx

    started, name = time.perf_counter(), served_name(cfg_registry, version)
    headers = {"authorization": f"Bearer {os.environ.get(server.key_env, '')}"}
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=server.timeout_s) as client:
            loaded = [m["id"] for m in _ok(client.get("/v1/models"), "list models")["data"]]
            if name not in loaded:
                path = os.path.relpath(reg["versions"][version]["path"], Path(server.model_root).resolve())
                _ok(client.post("/admin/adapters", json={"name": name, "path": path}), f"load {name}")
            _ok(client.post("/admin/aliases", json={"alias": cfg_registry.serve_alias, "target": name}),
                f"point {cfg_registry.serve_alias} at {name}")
            stale = [m for m in loaded if m.startswith(f"{cfg_registry.serve_alias}-v")
                     and m.removeprefix(f"{cfg_registry.serve_alias}-") not in keep]
            for old in stale:  # demoted at least one promotion ago: no new request reaches it
                _ok(client.delete(f"/admin/adapters/{old}"), f"unload {old}")
    except httpx.HTTPError as e:
        raise PromotionError(f"the server at {server.url} could not be switched to {version} "
                             f"({type(e).__name__}: {e}); the registry is unchanged and production is still "
                             f"{reg['aliases']['production']}") from None
    return {"server": server.url, "served_name": name, "unloaded": stale,
            "switch_s": round(time.perf_counter() - started, 3)}


def _ok(response, what: str) -> dict:
    if response.status_code >= 400:
        raise PromotionError(f"server refused to {what}: {response.status_code} {response.text[:300]}; the registry "
                             "is unchanged")
    return response.json()


def _mirror_wandb(cfg_registry, reg: dict) -> None:
    """Put the aliases on the W&B model artifacts of each version's fine-tuning run (online runs only)."""
    w = cfg_registry.wandb
    if not w.enabled or os.environ.get("WANDB_MODE") == "offline" or not os.environ.get("WANDB_API_KEY"):
        return
    import wandb

    api = wandb.Api()
    for alias, version in reg["aliases"].items():
        run = version and reg["versions"][version]["run"]
        run_id = run and json.loads((Path(run) / "manifest.json").read_text()).get("wandb_run_id")
        if not run_id:  # a version not trained by a logged run has no artifact to label
            continue
        for artifact in api.run(f"{w.entity}/{w.project}/{run_id}").logged_artifacts():
            if artifact.type == "model" and alias not in artifact.aliases:
                artifact.aliases.append(alias)
                artifact.save()
