"""Model aliases for zero-downtime promotion: clients ask for a stable name (`production`), the server resolves it
per request to a loaded, versioned adapter (`production-v3`).

Promotion loads the new version under its own name, then points the alias at it. A request already running on the
old version finishes there (nothing is unloaded under it); every request arriving after the switch runs on the new
one; no request ever meets a moment when the alias does not exist. Routes (admin keys only):

    GET /admin/aliases                      {"aliases": {alias: target}}
    POST /admin/aliases {alias, target}     point alias at a served model or adapter (created or moved)
    DELETE /admin/aliases/{alias}           remove it

An adapter an alias points to cannot be unloaded (400): move the alias first. The aliases are managed over REST;
`lifecycle serve` gives both front ends one AliasedEngine, so gRPC requests and ListModels resolve them too.
"""
from __future__ import annotations

import dataclasses

from fastapi import FastAPI, Request

from lifecycle.serve.limits import ApiError, require_admin
from lifecycle.serve.names import check_adapter_name, check_model
from lifecycle.serve.openai_api import _Body, parse
from lifecycle.serve.protocol import EngineError


class AliasedEngine:
    """The engine as the REST handlers see it: alias names are listed and resolved, everything else passes on."""

    def __init__(self, engine):
        self._engine = engine
        self.aliases: dict[str, str] = {}

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def model_names(self) -> list[str]:
        names = self._engine.model_names()
        return [*names, *(a for a, target in self.aliases.items() if target in names and a not in names)]

    def generate(self, request):
        """The engine's event stream for the request, its model name resolved (one dict lookup, no await)."""
        target = self.aliases.get(request.model)
        return self._engine.generate(dataclasses.replace(request, model=target) if target else request)

    async def unload_adapter(self, name: str) -> None:
        holders = sorted(a for a, target in self.aliases.items() if target == name)
        if holders:
            raise EngineError(f"{name!r} is what alias {', '.join(holders)} points to; point the alias at "
                              "another model first (POST /admin/aliases)")
        await self._engine.unload_adapter(name)


class AliasBody(_Body):
    alias: str
    target: str


def add_alias_routes(app: FastAPI, ctx) -> None:
    """Put an AliasedEngine in front of ctx.engine (or use the one it is: shared with the gRPC front end) and
    register the /admin/aliases routes."""
    engine = ctx.engine = ctx.engine if isinstance(ctx.engine, AliasedEngine) else AliasedEngine(ctx.engine)

    def admin(request: Request) -> None:
        require_admin(request.scope, ctx.settings.admin_key_ids, "aliases")

    @app.get("/admin/aliases")
    async def list_aliases(request: Request):
        admin(request)
        return {"aliases": dict(engine.aliases)}

    @app.post("/admin/aliases")
    async def set_alias(request: Request):
        admin(request)
        body = parse(await request.body(), AliasBody)
        alias = check_adapter_name(body.alias)
        served = engine._engine.model_names()
        if alias in served:
            raise ApiError(400, f"{alias!r} is a served model's own name, not an alias", param="alias")
        target = check_model(body.target, served)
        previous = engine.aliases.get(alias)
        engine.aliases[alias] = target  # one assignment: requests see the old target or the new, never neither
        return {"alias": alias, "target": target, "previous": previous}

    @app.delete("/admin/aliases/{alias}")
    async def delete_alias(request: Request, alias: str):
        admin(request)
        if engine.aliases.pop(alias, None) is None:
            raise ApiError(404, f"no alias {alias!r}", param="alias", code="model_not_found")
        return {"alias": alias, "deleted": True}
