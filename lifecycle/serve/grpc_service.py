"""The Generation service of proto/lifecycle_serve.proto over any Engine: validation, status mapping, accounting.

Built and wired by lifecycle.serve.grpc_server.build_server (which also guards every method with the API key).
Each RPC is one `_Call`: it validates the request, drives the engine iterator, and on any ending (success,
refusal, engine failure, client cancel, deadline) records exactly one row in ServeMetrics and the UsageMeter.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from contextlib import aclosing, asynccontextmanager
from typing import AsyncIterator

import grpc

from lifecycle.serve.auth import KeyStore, bearer
from lifecycle.serve.grpc_stubs import pb2, pb2_grpc
from lifecycle.serve.metrics import ServeMetrics
from lifecycle.serve.protocol import (
    Engine, EngineError, Event, GenerationRequest, ModelNotFound, NotReady, Overloaded, Sampling, TokenLogprob,
)
from lifecycle.serve.usage import UsageMeter, UsageRecord, mean_logprob, request_stats

log = logging.getLogger(__name__)
Code = grpc.StatusCode
FRONTEND = "grpc"
# Engine refusals -> (status, metrics outcome). Any other EngineError refuses the request itself (InvalidPrompt,
# ContextTooLong, NoChatTemplate, ...): INVALID_ARGUMENT. Any other exception is INTERNAL / "error".
REFUSALS = {Overloaded: (Code.RESOURCE_EXHAUSTED, "rejected"), NotReady: (Code.UNAVAILABLE, "unavailable"),
            ModelNotFound: (Code.NOT_FOUND, "client_error")}
# The usage table keeps HTTP statuses so one statement covers both front ends.
HTTP_TWIN = {Code.OK: 200, Code.INVALID_ARGUMENT: 400, Code.UNAUTHENTICATED: 401, Code.NOT_FOUND: 404,
             Code.RESOURCE_EXHAUSTED: 429, Code.CANCELLED: 499, Code.INTERNAL: 500, Code.UNAVAILABLE: 503,
             Code.DEADLINE_EXCEEDED: 504}
# A cancel this close to the deadline is the deadline: the client's own timer fires a moment before the server's.
DEADLINE_SLACK_S = 0.25


class Abort(Exception):
    """How an RPC ends when it does not end OK."""

    def __init__(self, code: grpc.StatusCode, message: str, outcome: str, retry_after: float | None = None):
        super().__init__(message)
        self.code, self.message, self.outcome, self.retry_after = code, message, outcome, retry_after


def invalid(field: str, reason: str) -> Abort:
    return Abort(Code.INVALID_ARGUMENT, f"{field}: {reason}", "client_error")


def to_engine_request(req, engine: Engine, settings, request_id: str, deadline: float) -> GenerationRequest:
    """The engine's request for a GenerateRequest, or INVALID_ARGUMENT naming the first bad field."""
    s = settings
    if req.prompt and req.prompt_ids:
        raise invalid("prompt", "set either prompt or prompt_ids, not both")
    if not req.prompt and not req.prompt_ids:
        raise invalid("prompt", "empty: send a non-empty prompt or prompt_ids")
    if any(t < 0 for t in req.prompt_ids):
        raise invalid("prompt_ids", "token ids are >= 0")
    prompt_ids = list(req.prompt_ids) or engine.encode(req.prompt)
    # Unset max_tokens: the default, shortened to what the context leaves (a short request is never refused).
    room = max(1, engine.context_length - len(prompt_ids))
    max_tokens = req.max_tokens if req.HasField("max_tokens") else min(s.default_max_tokens, room)
    if not 1 <= max_tokens <= s.max_tokens_cap:
        raise invalid("max_tokens", f"must be in [1, {s.max_tokens_cap}], got {max_tokens}")
    temperature = req.temperature if req.HasField("temperature") else 1.0
    if not (math.isfinite(temperature) and temperature >= 0):
        raise invalid("temperature", f"must be >= 0, got {temperature}")
    top_p = req.top_p if req.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise invalid("top_p", f"must be in (0, 1], got {top_p}")
    if req.top_k < 0:
        raise invalid("top_k", f"must be >= 0 (0: off), got {req.top_k}")
    if len(req.stop) > s.max_stop:
        raise invalid("stop", f"at most {s.max_stop} stop sequences, got {len(req.stop)}")
    logprobs = req.logprobs if req.HasField("logprobs") else None
    if logprobs is not None and not 0 <= logprobs <= s.max_logprobs:
        raise invalid("logprobs", f"must be in [0, {s.max_logprobs}], got {logprobs}")
    # Each token's log-prob always (k=0 when not asked; the response then carries none), as over REST: the usage
    # log's mean_logprob tells the monitor how sure the model was of every answer, whichever front end served it.
    sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=req.top_k,
                        stop=tuple(req.stop), seed=req.seed if req.HasField("seed") else None,
                        logprobs=0 if logprobs is None else logprobs, echo=req.echo and logprobs is not None)
    return GenerationRequest(prompt_ids=prompt_ids, sampling=sampling, model=req.model or engine.model_names()[0],
                             deadline=deadline, request_id=request_id)


def logprobs_pb(items: list[TokenLogprob] | None) -> list:
    return [pb2.TokenLogprob(token=t.token, logprob=t.logprob, top=t.top) for t in items or ()]


class _Call:
    """One RPC: what it asked, what the engine produced, how it ended; recorded once by `finish`."""

    def __init__(self, service: "GenerationService", context, route: str):
        self.service, self.context, self.route = service, context, route
        self.started, self.ts, self.first_token_at = time.monotonic(), time.time(), None
        md = dict(context.invocation_metadata() or ())
        self.key_id = service.keys.identify(bearer(md.get("authorization")))
        self.id, self.model, self.deadline = f"grpc-{uuid.uuid4().hex[:16]}", "unknown", None
        self.code, self.outcome, self.finish_reason = Code.OK, "ok", None
        self.prompt, self.prompt_ids, self.text, self.token_ids = "", [], [], []
        self.logprobs, self.prompt_logprobs, self.usage = [], None, (0, 0)
        self.show_logprobs = False  # whether the client asked for them (the engine always gives each token's)

    async def events(self, request) -> AsyncIterator[Event]:
        """The engine's events for `request`, each also accumulated here; refusals and failures raise Abort."""
        engine, settings = self.service.engine, self.service.settings
        remaining = self.context.time_remaining()
        budget = settings.request_timeout_s if remaining is None else min(remaining, settings.request_timeout_s)
        self.deadline = time.monotonic() + budget
        job = to_engine_request(request, engine, settings, self.id, self.deadline)
        self.prompt, self.prompt_ids = request.prompt, job.prompt_ids
        self.show_logprobs = request.HasField("logprobs")
        if job.model in engine.model_names():
            self.model = job.model  # unknown names stay "unknown": a metrics label must not take client input
        async with aclosing(engine.generate(job)) as stream:
            try:
                async for event in stream:
                    self._observe(event)
                    yield event
                if self.finish_reason is None:
                    raise Abort(Code.INTERNAL, "engine error: the stream ended without a finish reason", "error")
            except EngineError as e:
                code, outcome = next((v for k, v in REFUSALS.items() if isinstance(e, k)),
                                     (Code.INVALID_ARGUMENT, "client_error"))
                raise Abort(code, str(e), outcome, getattr(e, "retry_after", None)) from None
            except (Abort, asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as e:  # an engine bug must end the call loudly, never as a short success
                log.exception("engine failed during %s", self.id)
                raise Abort(Code.INTERNAL, f"engine error: {type(e).__name__}: {e}", "error") from None

    def _observe(self, event: Event) -> None:
        if event.finish_reason == "error":
            raise Abort(Code.INTERNAL, f"engine error: {event.error or 'unknown'}", "error")
        if event.finish_reason == "timeout":
            raise Abort(Code.DEADLINE_EXCEEDED, "deadline exceeded; the job was aborted", "timeout")
        if event.finish_reason == "cancelled":  # the engine dropped the job itself (stopping): worth a retry
            raise Abort(Code.UNAVAILABLE, "the server aborted the job (shutting down); retry", "unavailable")
        if event.token_ids and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        self.text.append(event.text)
        self.token_ids += event.token_ids
        self.logprobs += event.logprobs
        self.usage = (event.prompt_tokens, event.completion_tokens)
        self.finish_reason = event.finish_reason

    def message(self, event: Event | None = None):
        """A stream chunk for `event`, or (None) the whole response so far."""
        e = event
        return pb2.GenerateResponse(
            id=self.id, model=self.model, text=e.text if e else "".join(self.text),
            token_ids=e.token_ids if e else self.token_ids, finish_reason=(e.finish_reason if e else
                                                                           self.finish_reason) or "",
            usage=pb2.Usage(prompt_tokens=self.usage[0], completion_tokens=self.usage[1]),
            logprobs=logprobs_pb(e.logprobs if e else self.logprobs) if self.show_logprobs else [],
            prompt_logprobs=logprobs_pb(e.prompt_logprobs if e else self.prompt_logprobs))

    def ended(self, error: BaseException | None) -> Abort | None:
        """Classify how the call ended; the Abort to send, if any."""
        if isinstance(error, Abort):
            self.code, self.outcome = error.code, error.outcome
            return error
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            late = self.deadline is not None and time.monotonic() >= self.deadline - DEADLINE_SLACK_S
            self.code, self.outcome = (Code.DEADLINE_EXCEEDED, "timeout") if late else (Code.CANCELLED, "cancelled")
            return None  # nobody is listening; the cancellation propagates
        if error is not None:
            log.exception("gRPC %s failed", self.route, exc_info=error)
            self.code, self.outcome = Code.INTERNAL, "error"
            return Abort(Code.INTERNAL, f"internal error: {type(error).__name__}", "error")
        return None

    def record(self) -> None:
        """One row in the metrics and, for a known key, the usage meter."""
        svc, now = self.service, time.monotonic()
        seconds, (prompt_tokens, completion_tokens) = now - self.started, self.usage
        m = svc.metrics
        m.request(FRONTEND, self.route, self.model, self.outcome, seconds)
        m.tokens(self.model, prompt_tokens, completion_tokens)
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        if ttft is not None:
            m.ttft.labels(FRONTEND).observe(ttft)
            if completion_tokens > 1:
                m.tpot.labels(FRONTEND).observe((now - self.first_token_at) / (completion_tokens - 1))
        if self.key_id is None:
            return
        output = "".join(self.text)
        svc.meter.record(UsageRecord(
            key_id=self.key_id, model=self.model, frontend=FRONTEND, route=self.route,
            status=HTTP_TWIN.get(self.code, 500), prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            latency_ms=seconds * 1e3, ttft_ms=None if ttft is None else ttft * 1e3, finish_reason=self.finish_reason,
            mean_logprob=mean_logprob(self.logprobs), request_id=self.id,
            stats=request_stats(self.prompt, output, self.prompt_ids, self.token_ids) if self.prompt_ids else None,
            text={"prompt": self.prompt, "output": output}, ts=self.ts))


class GenerationService(pb2_grpc.GenerationServicer):
    """lifecycle.serve.v1.Generation over `engine`."""

    def __init__(self, engine: Engine, keys: KeyStore, meter: UsageMeter, metrics: ServeMetrics, settings):
        self.engine, self.keys, self.meter, self.metrics, self.settings = engine, keys, meter, metrics, settings

    @asynccontextmanager
    async def _call(self, context, route: str):
        """Run one call; on the way out record it, then send its error status if it failed."""
        call, error = _Call(self, context, route), None
        self.metrics.in_flight.labels(FRONTEND).inc()
        try:
            yield call
        except BaseException as e:
            error = e
        finally:
            self.metrics.in_flight.labels(FRONTEND).dec()
            abort = call.ended(error)
            call.record()
        if abort is not None:
            trailing = (("retry-after", str(math.ceil(abort.retry_after))),) if abort.retry_after else ()
            await context.abort(abort.code, abort.message, trailing_metadata=trailing)
        if error is not None:
            raise error

    async def Generate(self, request, context):
        async with self._call(context, "Generate") as call:
            async with aclosing(call.events(request)) as events:
                async for _ in events:
                    pass
        return call.message()

    async def GenerateStream(self, request, context):
        async with self._call(context, "GenerateStream") as call:
            async with aclosing(call.events(request)) as events:
                async for event in events:
                    if event.text or event.token_ids or event.finish_reason:
                        yield call.message(event)

    async def ListModels(self, request, context):
        async with self._call(context, "ListModels") as call:
            call.model = "-"
            names = self.engine.model_names()
        return pb2.ListModelsResponse(models=[pb2.Model(name=n, context_length=self.engine.context_length)
                                              for n in names])
