"""The gRPC front end (grpc.aio) over any Engine: lifecycle.serve.v1.Generation, health, reflection.

    server = build_server(engine, keys, meter, metrics, GrpcSettings(port=50051))  # inside a running event loop
    await server.start()            # the port is already bound (settings.host:settings.port)
    ...
    await server.stop(grace)        # health turns NOT_SERVING first, then in-flight calls get `grace` seconds

Auth: every method needs metadata `authorization: Bearer <key>` (a KeyStore key; UNAUTHENTICATED otherwise), except
grpc.health.v1.Health, which load balancers probe without keys. Reflection is guarded too (the schema is no secret,
but nothing is open that need not be): `grpcurl -H "authorization: Bearer $KEY" -plaintext host:port list`. The
guard wraps whatever the server serves, so a method added later fails closed.
Health: "" and "lifecycle.serve.v1.Generation" are SERVING only while engine.ready (NOT_SERVING while loading,
draining, after a failed load, and from server.stop on). Check reads engine.ready live; Watch follows it every
`readiness_poll_s`.
Statuses: a bad field -> INVALID_ARGUMENT naming it; ModelNotFound -> NOT_FOUND; ContextTooLong -> INVALID_ARGUMENT
with both numbers; Overloaded -> RESOURCE_EXHAUSTED with `retry-after` (seconds) in trailing metadata; NotReady ->
UNAVAILABLE; a message over max_message_bytes -> RESOURCE_EXHAUSTED (from gRPC itself, before our code: not
counted in the metrics); deadline (the client's, capped at request_timeout_s) -> DEADLINE_EXCEEDED and the job is
aborted; client cancel -> the engine iterator is closed (job aborted); an engine failure, even mid-stream, or a
stream without a finish reason -> INTERNAL carrying the engine's error; a job the engine drops itself (finish_reason
"cancelled", e.g. while stopping) -> UNAVAILABLE; any other EngineError (InvalidPrompt, ...) -> INVALID_ARGUMENT.
Each call is one `lifecycle_requests{frontend="grpc"}` sample and one usage row (lifecycle.serve.grpc_service):
key id, model (served names only; anything else is "unknown"), tokens, latency, TTFT, HTTP-twin status.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from lifecycle.errors import ConfigError
from lifecycle.serve.auth import KeyStore, bearer
from lifecycle.serve.grpc_service import FRONTEND, GenerationService
from lifecycle.serve.grpc_stubs import pb2, pb2_grpc
from lifecycle.serve.metrics import ServeMetrics
from lifecycle.serve.protocol import Engine
from lifecycle.serve.usage import UsageMeter

log = logging.getLogger(__name__)
GENERATION = pb2.DESCRIPTOR.services_by_name["Generation"].full_name
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


@dataclass
class GrpcSettings:
    """The gRPC front end's settings (serve.grpc; names and defaults as RestSettings where they overlap)."""
    host: str = "127.0.0.1"
    port: int = 50051
    max_message_bytes: int = 1 << 20   # a larger request message: RESOURCE_EXHAUSTED
    max_tokens_cap: int = 4096         # max_tokens above it: INVALID_ARGUMENT
    default_max_tokens: int = 16       # when a request leaves max_tokens unset (clamped to what the context leaves)
    max_stop: int = 4                  # stop sequences per request
    max_logprobs: int = 20             # most likely tokens per position
    request_timeout_s: float = 600.0   # caps every request's deadline (a client may set a shorter one)
    readiness_poll_s: float = 0.2      # how often health Watch streams see engine.ready changes

    def __post_init__(self):
        checks = {"port": 0 <= self.port <= 65535, "max_message_bytes": self.max_message_bytes >= 1024,
                  "max_tokens_cap": self.max_tokens_cap >= 1,
                  "default_max_tokens": 1 <= self.default_max_tokens <= self.max_tokens_cap,
                  "max_stop": self.max_stop >= 0, "max_logprobs": self.max_logprobs >= 0,
                  "request_timeout_s": self.request_timeout_s > 0, "readiness_poll_s": self.readiness_poll_s > 0}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"serve.grpc.{name}={getattr(self, name)}: out of range "
                                  "(default_max_tokens must also be <= max_tokens_cap)")


class ReadinessHealth(HealthServicer):
    """grpc.health.v1.Health whose status is engine.ready."""

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine, self._last = engine, None

    async def sync(self) -> None:
        serving = self.engine.ready
        if serving != self._last:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for service in ("", GENERATION):
                await self.set(service, status)
            self._last = serving

    async def Check(self, request, context):
        await self.sync()
        return await super().Check(request, context)

    async def follow(self, every: float) -> None:
        while True:
            await self.sync()
            await asyncio.sleep(every)


class KeyGuard(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for any method outside OPEN_PREFIXES without a known bearer key."""

    def __init__(self, keys: KeyStore, metrics: ServeMetrics):
        self.keys, self.metrics = keys, metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if self.keys.identify(bearer(metadata.get("authorization"))) is not None:
            return handler
        self.metrics.request(FRONTEND, details.method.rpartition("/")[2], "unknown", "client_error", 0.0)
        return _denied(handler)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only answers UNAUTHENTICATED."""
    async def deny(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or unknown API key: send metadata `authorization: Bearer <key>`")
    shapes = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
              (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = shapes[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def build_server(engine: Engine, keys: KeyStore, meter: UsageMeter, metrics: ServeMetrics,
                 settings: GrpcSettings) -> grpc.aio.Server:
    """A grpc.aio server for `engine`, bound to settings.host:settings.port, not yet started."""
    if not len(keys):
        log.warning("gRPC: no API keys configured; every Generation call will be UNAUTHENTICATED")
    server = grpc.aio.server(interceptors=[KeyGuard(keys, metrics)],
                             options=[("grpc.max_receive_message_length", settings.max_message_bytes)])
    pb2_grpc.add_GenerationServicer_to_server(GenerationService(engine, keys, meter, metrics, settings), server)
    health = ReadinessHealth(engine)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (GENERATION, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    port = server.add_insecure_port(address)
    log.info("gRPC: listening on %s:%d (%s)", settings.host, port, GENERATION)
    following = asyncio.get_running_loop().create_task(health.follow(settings.readiness_poll_s))
    stop = server.stop

    async def stop_serving(grace: float | None):
        # Load balancers watching health see NOT_SERVING before the listener goes away.
        await health.enter_graceful_shutdown()
        following.cancel()
        return await stop(grace)

    server.stop = stop_serving  # the same signature as grpc.aio.Server.stop
    return server
