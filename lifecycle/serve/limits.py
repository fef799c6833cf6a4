"""What guards the REST routes before a handler runs: OpenAI-shaped errors, the API-key gate (with drain and
in-flight counting) and the body-size limit. Both middlewares are plain ASGI so streaming responses pass through
untouched and the body is never buffered by them."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from lifecycle.serve.auth import KeyStore, bearer
from lifecycle.serve.metrics import ServeMetrics
from lifecycle.serve.usage import UsageMeter, UsageRecord

OPEN_PATHS = ("/health", "/ready")  # probes: no key, not counted, answered while draining
FRONTEND = "rest"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 499: "cancelled", 500: "server_error", 503: "service_unavailable",
               504: "timeout"}


class ApiError(Exception):
    """An error the client sees as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def body(self) -> bytes:
        err = {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
               "param": self.param, "code": self.code}
        return json.dumps({"error": err}).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None:  # whole seconds, at least 1: what clients and proxies parse
            headers.append((b"retry-after", str(max(1, math.ceil(self.retry_after))).encode()))
        return headers

    async def send_to(self, send) -> None:
        """Answer an ASGI request with this error."""
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers()})
        await send({"type": "http.response.body", "body": self.body()})


def require_admin(scope: dict, admin_key_ids: list[str], what: str) -> None:
    """403 unless the request's key (the gate put its id in the scope) is one of the admin keys."""
    if scope["state"].get("key_id") not in admin_key_ids:
        raise ApiError(403, f"this key may not manage {what}", code="not_admin")


def outcome_of(status: int) -> str:
    """The metrics outcome (metrics.OUTCOMES) of a finished request's status."""
    if status < 400:
        return "ok"
    return {429: "rejected", 503: "unavailable", 499: "cancelled", 504: "timeout"}.get(
        status, "client_error" if status < 500 else "error")


@dataclass
class ServeState:
    """What the runner and the probes share: drain flag, requests in flight, the engine's load failure."""
    draining: bool = False
    active: int = 0
    load_error: str | None = None


class Gate:
    """API key on every path but the probes (deny by default), 503 while draining, in-flight count, and
    metrics + usage for every request a handler did not account for itself (scope["state"]["accounted"])."""

    def __init__(self, app, keys: KeyStore, state: ServeState, metrics: ServeMetrics, meter: UsageMeter | None,
                 known_paths: set[str]):
        self.app, self.keys, self.state, self.metrics, self.meter = app, keys, state, metrics, meter
        self.known_paths = known_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        scope.setdefault("state", {})
        key_id = self.keys.identify(bearer(_header(scope, b"authorization")))
        try:
            if key_id is None:
                status[0] = 401
                return await ApiError(401, "a valid API key is required: Authorization: Bearer <key>",
                                      code="invalid_api_key").send_to(send)
            scope["state"]["key_id"] = key_id
            if self.state.draining and scope["path"] != "/metrics":
                status[0] = 503
                return await ApiError(503, "the server is shutting down", code="draining",
                                      retry_after=1).send_to(send)
            await self._run(scope, receive, send_status)
        finally:
            if not scope["state"].get("accounted"):
                self._account(scope, key_id, status[0], time.monotonic() - started)

    async def _run(self, scope, receive, send):
        self.state.active += 1
        self.metrics.in_flight.labels(FRONTEND).inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.active -= 1
            self.metrics.in_flight.labels(FRONTEND).dec()

    def _account(self, scope, key_id: str | None, status: int, seconds: float) -> None:
        path = scope["path"] if scope["path"] in self.known_paths else "unmatched"  # bounded label values
        route = scope["route"].path if "route" in scope else path
        self.metrics.request(FRONTEND, route, "-", outcome_of(status), seconds)
        if self.meter is not None and route != "/metrics":  # scrapes are not usage
            self.meter.record(UsageRecord(key_id=key_id or "-", model="-", frontend=FRONTEND, route=route,
                                          status=status, latency_ms=seconds * 1000))


class BodyLimit:
    """413 for a body over `max_bytes`, before anything parses it: at once from Content-Length, or as soon as a
    chunked body passes the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"the request body is over the limit of {self.max_bytes} bytes",
                             code="request_too_large")
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_large.send_to(send)
        seen, started = [0], [False]

        async def limited_receive():
            message = await receive()
            seen[0] += len(message.get("body", b""))
            if seen[0] > self.max_bytes:
                raise too_large
            return message

        async def tracked_send(message):
            started[0] = started[0] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except ApiError as e:  # raised by limited_receive through a handler that did not catch it
            if e is not too_large or started[0]:
                raise
            await too_large.send_to(send)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None
