"""The OpenAI-compatible REST front end over any protocol.Engine.

    app = build_app(engine, keys, meter, metrics, RestSettings(cors_origins=[...], admin_key_ids=["ops"]))
    asyncio.run(serve(app, "127.0.0.1", 8000))          # lifecycle.serve.runner: SIGTERM drains, exit 0

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/{model}], GET /metrics,
POST /admin/adapters {name, path}, DELETE /admin/adapters/{name} (admin keys only), and the unauthenticated probes
GET /health (alive) and GET /ready (200 once the engine is loaded, 503 while loading, after a failed load and while
draining). Every other path needs `Authorization: Bearer <key>` (deny by default). The engine starts in the
background at app start-up (`app.state.serve.load_error` holds a load failure); every error is OpenAI-shaped.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from lifecycle.errors import ConfigError
from lifecycle.serve.aliases import add_alias_routes
from lifecycle.serve.auth import KeyStore
from lifecycle.serve.feedback import add_feedback_route
from lifecycle.serve.generation import Route, handle, refusal
from lifecycle.serve.limits import ApiError, BodyLimit, Gate, ServeState, require_admin
from lifecycle.serve.metrics import ServeMetrics
from lifecycle.serve.names import adapter_dir, check_adapter_name, check_model
from lifecycle.serve.openai_api import ChatRequest, CompletionRequest, _Body, check_chat, check_completion, parse
from lifecycle.serve.plan import chat_plan, completion_plan
from lifecycle.serve.protocol import EngineError, ModelNotFound, NotReady, Overloaded
from lifecycle.serve.usage import UsageMeter

log = logging.getLogger(__name__)

COMPLETIONS = Route("/v1/completions", CompletionRequest, check_completion, completion_plan)
CHAT = Route("/v1/chat/completions", ChatRequest, check_chat, chat_plan)


@dataclass
class RestSettings:
    """Limits and switches of the REST front end (a structured config: checked before any model loads)."""
    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 4096          # the most max_tokens a request may ask for
    default_max_tokens: int = 16        # when a request does not say (clamped to what the context leaves)
    max_n: int = 8
    max_stop: int = 16                  # lm-eval sends a task's whole `until` list (OpenAI's 4 is too few)
    max_prompts: int = 64               # prompts in one /v1/completions batch (lm-eval sends batches)
    max_logprobs: int = 20
    request_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0       # SIGTERM: how long in-flight requests may take to finish
    cors_origins: list[str] = field(default_factory=list)   # explicit origins; empty: no CORS headers at all
    admin_key_ids: list[str] = field(default_factory=list)  # key ids (KeyStore names) allowed on /admin
    model_root: str | None = None       # adapters load only from directories inside it; None: admin loading off
    log_text: bool = False              # keep prompt and output text in the usage log

    def __post_init__(self):
        for name in ("max_body_bytes", "max_tokens_cap", "default_max_tokens", "max_n", "max_stop", "max_prompts",
                     "request_timeout_s", "drain_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"serve.rest.{name}={getattr(self, name)}: must be positive")
        if "*" in self.cors_origins:
            raise ConfigError("serve.rest.cors_origins: list the allowed origins; '*' is refused")
        if self.default_max_tokens > self.max_tokens_cap:
            raise ConfigError("serve.rest.default_max_tokens is over serve.rest.max_tokens_cap")


@dataclass
class Context:
    """What the handlers share (app.state.ctx)."""
    engine: object
    settings: RestSettings
    metrics: ServeMetrics
    meter: UsageMeter | None
    state: ServeState


def build_app(engine, keys: KeyStore, meter: UsageMeter | None, metrics: ServeMetrics,
              settings: RestSettings) -> FastAPI:
    """The FastAPI app: routes, key gate, body limit, CORS, OpenAI-shaped errors, engine start in the lifespan."""
    state = ServeState()
    ctx = Context(engine, settings, metrics, meter, state)
    app = FastAPI(title="lifecycle", lifespan=_lifespan(ctx), docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve, app.state.ctx = state, ctx
    _add_routes(app, ctx)
    _add_admin_routes(app, ctx)
    add_alias_routes(app, ctx)
    add_feedback_route(app, ctx)
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    known_paths = {route.path for route in app.routes}  # labels for requests the gate answers before routing
    app.add_middleware(Gate, keys=keys, state=state, metrics=metrics, meter=meter, known_paths=known_paths)
    if settings.cors_origins:  # outermost, so a preflight is answered without a key (browsers send none)
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["authorization", "content-type"])
    return app


def _lifespan(ctx: Context):
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        loading = asyncio.create_task(_load(ctx))
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await ctx.engine.stop()
            if ctx.meter is not None:
                await asyncio.to_thread(ctx.meter.flush)
    return lifespan


async def _load(ctx: Context) -> None:
    """Start the engine in the background so /health answers while it loads; a failure keeps /ready at 503."""
    try:
        await ctx.engine.start()
        log.info("engine ready: %s", ", ".join(ctx.engine.model_names()))
    except Exception as e:
        ctx.state.load_error = f"{type(e).__name__}: {e}"
        log.error("engine failed to load, /ready stays 503: %s", ctx.state.load_error, exc_info=e)


def _add_routes(app: FastAPI, ctx: Context) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if ctx.state.draining:
            raise ApiError(503, "draining: the server is shutting down", code="draining")
        if ctx.state.load_error:
            raise ApiError(503, f"the model failed to load: {ctx.state.load_error}", code="load_failed")
        if not ctx.engine.ready:
            raise ApiError(503, "the model is still loading", code="loading", retry_after=1)
        return {"status": "ready", "models": ctx.engine.model_names()}

    @app.get("/metrics")
    async def metrics():
        body, content_type = ctx.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(m) for m in ctx.engine.model_names()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        return _model_card(check_model(model, ctx.engine.model_names()))

    @app.post(COMPLETIONS.path)
    async def completions(request: Request):
        return await handle(request, ctx, COMPLETIONS)

    @app.post(CHAT.path)
    async def chat(request: Request):
        return await handle(request, ctx, CHAT)


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "lifecycle"}


class AdapterBody(_Body):
    name: str
    path: str


def _add_admin_routes(app: FastAPI, ctx: Context) -> None:
    def admin(request: Request) -> None:
        require_admin(request.scope, ctx.settings.admin_key_ids, "adapters")

    @app.post("/admin/adapters")
    async def load_adapter(request: Request):
        admin(request)
        body = parse(await request.body(), AdapterBody)
        name = check_adapter_name(body.name)
        path = adapter_dir(ctx.settings.model_root, body.path)
        try:
            await ctx.engine.load_adapter(name, str(path))
        except ModelNotFound as e:
            raise ApiError(404, str(e), param="path", code="model_not_found") from None
        except (NotReady, Overloaded) as e:
            raise refusal(e) from None
        except EngineError as e:  # e.g. the name is taken, or the weights are refused
            raise ApiError(400, str(e), param="path", code="adapter_refused") from None
        log.info("adapter %s loaded from %s", name, path)
        return _model_card(name)

    @app.delete("/admin/adapters/{name:path}")
    async def unload_adapter(request: Request, name: str):
        admin(request)
        if name not in ctx.engine.model_names():  # a loaded name is fine whatever it looks like
            check_adapter_name(name)
        try:
            await ctx.engine.unload_adapter(name)
        except ModelNotFound as e:
            raise ApiError(404, str(e), param="name", code="model_not_found") from None
        except (NotReady, Overloaded) as e:
            raise refusal(e) from None
        except EngineError as e:  # e.g. the base model
            raise ApiError(400, str(e), param="name", code="adapter_refused") from None
        return {"id": name, "object": "model", "deleted": True}


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_request, e: ApiError, extra: dict | None = None):
        headers = {**{k.decode(): v.decode() for k, v in e.headers()}, **(extra or {})}
        return Response(e.body(), status_code=e.status, headers=headers)

    async def http_error(request, e: HTTPException):
        code = {404: "route_not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"{request.method} {request.url.path}: {e.detail}"
        return await api_error(request, ApiError(e.status_code, message, code=code), e.headers)  # 405: Allow

    async def validation_error(request, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        param = str(err.get("loc", ("?",))[-1])
        return await api_error(request, ApiError(400, f"{param}: {err.get('msg', 'invalid')}", param=param))

    async def server_error(request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
        return await api_error(request, ApiError(500, "internal server error", code="internal_error"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)
