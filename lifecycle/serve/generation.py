"""The two generation routes end to end: parse, plan, run the jobs under the request's deadline while watching for
the client going away, answer (JSON or server-sent events) and account for the request exactly once."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lifecycle.serve import openai_format as fmt
from lifecycle.serve.fanout import WAIT, ClientGone, Deadline, Fanout, collect, race, wait_disconnect
from lifecycle.serve.limits import ApiError
from lifecycle.serve.openai_api import parse
from lifecycle.serve.plan import Plan
from lifecycle.serve.protocol import (
    ContextTooLong, EngineError, InvalidPrompt, ModelNotFound, NoChatTemplate, NotReady, Overloaded,
)
from lifecycle.serve.tally import Tally, record

log = logging.getLogger(__name__)


@dataclass
class Route:
    """One generation route: its body model, its range checks and its planner."""
    path: str
    body: type
    check: Callable
    plan: Callable


def refusal(e: EngineError) -> ApiError:
    """The HTTP error for an engine's refusal."""
    if isinstance(e, Overloaded):
        return ApiError(429, str(e), code="overloaded", retry_after=e.retry_after)
    if isinstance(e, ModelNotFound):
        return ApiError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, ContextTooLong):
        return ApiError(400, str(e), param="max_tokens", code="context_length_exceeded")
    if isinstance(e, InvalidPrompt):
        return ApiError(400, str(e), param="prompt", code="invalid_prompt")
    if isinstance(e, NoChatTemplate):
        return ApiError(400, str(e), param="messages", code="no_chat_template")
    if isinstance(e, NotReady):
        return ApiError(503, str(e), code="not_ready", retry_after=1)
    return ApiError(400, str(e), code="refused")


async def handle(request: Request, ctx, route: Route) -> Response:
    """Answer one generation request; every way out is accounted for in `finally`."""
    request.scope["state"]["accounted"] = True
    tally = Tally(route.path, request.scope["state"].get("key_id", "-"))
    streaming = False
    try:
        req = parse(await request.body(), route.body)
        route.check(req, ctx.settings)
        if not ctx.engine.ready:  # the tokenizer and the context length come with the model
            raise NotReady("the model is not loaded (still loading, draining or failed to load)")
        plan = route.plan(req, ctx.engine, ctx.settings)
        tally.model, tally.request_id = plan.model, plan.rid
        if plan.stream:
            response = await start_stream(request, ctx, plan, tally)
            streaming = True
            return response
        return await answer(request, ctx, plan, tally)
    except (ApiError, EngineError) as e:  # an EngineError here: from encode / render_chat / the readiness check
        error = e if isinstance(e, ApiError) else refusal(e)
        tally.status = error.status
        return Response(error.body(), status_code=error.status, headers=_headers(error))
    except ClientGone:
        tally.status = 499  # nginx's "client closed request"; nobody reads this response
        return Response(status_code=499)
    finally:
        if not streaming:  # a stream accounts for itself when it ends
            record(tally, ctx.metrics, ctx.meter, ctx.settings.log_text)


def _headers(e: ApiError) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in e.headers()}


async def answer(request: Request, ctx, plan: Plan, tally: Tally) -> Response:
    """The non-streaming answer: every job to its end, or 504 at the deadline, or cancelled if the client leaves."""
    fan, choices = Fanout(ctx.engine, plan.requests).start(), plan.choices()
    try:
        await race(collect(fan, choices), request.receive, plan.deadline)
    except EngineError as e:
        raise refusal(e) from None
    except Deadline:
        raise ApiError(504, f"no answer within {ctx.settings.request_timeout_s} s", code="timeout") from None
    finally:
        await fan.close()
        tally.fold(plan.prompts, choices, fan)
    failed = [c for c in choices if c.finish_reason not in ("stop", "length")]
    if any(c.finish_reason == "timeout" for c in failed):
        raise ApiError(504, f"no answer within {ctx.settings.request_timeout_s} s", code="timeout")
    if failed:
        raise ApiError(500, failed[0].error or f"generation ended with {failed[0].finish_reason}",
                       code="engine_error")
    use = fmt.usage(tally.prompt_tokens, tally.completion_tokens)
    body = fmt.chat_body(plan.rid, plan.created, plan.model, choices, plan.logprobs, use) if plan.chat else \
        fmt.completion_body(plan.rid, plan.created, plan.model, choices, plan.echo, plan.logprobs, use)
    return JSONResponse(body)


async def start_stream(request: Request, ctx, plan: Plan, tally: Tally) -> Response:
    """Wait for every job's first event (so a refusal is still a proper status), then stream the rest."""
    fan = Fanout(ctx.engine, plan.requests).start()
    try:
        firsts = await race(_first_events(fan, len(plan.requests)), request.receive, plan.deadline)
    except BaseException as e:
        await fan.close()
        if isinstance(e, EngineError):
            raise refusal(e) from None
        if isinstance(e, Deadline):
            raise ApiError(504, f"no first token within {ctx.settings.request_timeout_s} s", code="timeout") \
                from None
        raise
    return EventStream(_chunks(ctx, plan, fan, firsts, tally))


async def _first_events(fan: Fanout, jobs: int) -> list:
    firsts, seen = [], set()
    while len(seen) < jobs and (item := await fan.next()) is not None:
        firsts.append(item)
        seen.add(item[0])
    return firsts


async def _chunks(ctx, plan: Plan, fan: Fanout, firsts: list, tally: Tally):
    """Server-sent events of a started stream; `[DONE]` exactly once unless the client left."""
    choices, ended, pending, started = plan.choices(), None, list(firsts), set()
    try:
        for c in choices if plan.chat else ():
            yield fmt.sse(fmt.chat_chunk(plan.head(), c.index, {"role": "assistant", "content": ""}, None, None))
        try:
            while (item := pending.pop(0) if pending else await _next(fan, plan.deadline)) is not None:
                index, event = item
                for chunk in _event_chunks(plan, choices[index], event, index not in started):
                    yield chunk
                started.add(index)
                if event.finish_reason == "error":
                    ended = "error"
                    yield fmt.error_event(event.error or "the engine failed mid-generation")
                    break
        except Deadline:
            ended = "timeout"
            await fan.close()  # abort the jobs now, not after the last chunk is written
            for c in (c for c in choices if c.finish_reason is None):
                c.finish_reason = "timeout"
                yield fmt.sse(_finish_chunk(plan, c.index, "timeout"))
        tally.fold(plan.prompts, choices, fan)
        if plan.include_usage:
            yield fmt.sse(fmt.usage_chunk(plan.head(), plan.chat, fmt.usage(tally.prompt_tokens,
                                                                          tally.completion_tokens)))
        ended = ended or next((c.finish_reason for c in choices if c.finish_reason not in ("stop", "length")),
                              "stop")
        yield fmt.DONE
    except Exception:
        ended = "error"  # a bug of ours mid-stream: EventStream tells the client; count it as an error
        raise
    finally:
        await fan.close()
        if ended is None:
            tally.fold(plan.prompts, choices, fan)
        tally.stream_ended(ended)
        record(tally, ctx.metrics, ctx.meter, ctx.settings.log_text)


async def _next(fan: Fanout, deadline: float):
    # An event already queued (the engine hands a step's events over together) is taken without arming a timer,
    # ~4 us an event: as before, since a timer cannot fire before an await that does not suspend.
    item = fan.poll()
    if item is not WAIT:
        return item
    # Not asyncio.wait_for: on 3.11 it swallows a cancellation that lands as the event arrives, and the stream
    # of a departed client would then run to its end.
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            return await fan.next()
    except TimeoutError:
        raise Deadline() from None


def _event_chunks(plan: Plan, c, event, first: bool) -> list[str]:
    """The chunks one engine event becomes: none for an empty step or an error (the caller reports it)."""
    offset = (len(c.prompt_text) if plan.echo else 0) + len(c.text)  # where this event's text starts
    c.add(event)
    echoed = first and plan.echo  # echo in a stream: the prompt (and its log-probs) lead the first chunk
    text = c.prompt_text + event.text if echoed else event.text
    if event.finish_reason == "error" or not (text or event.finish_reason or (plan.logprobs and event.logprobs)):
        return []
    if plan.chat:
        lp = fmt.chat_logprobs(event.logprobs) if plan.logprobs else None
        delta = {"content": text} if text else {}
        return [fmt.sse(fmt.chat_chunk(plan.head(), c.index, delta, event.finish_reason, lp))]
    lp = None
    if plan.logprobs:
        entries = ((event.prompt_logprobs or []) if echoed else []) + event.logprobs
        lp = fmt.legacy_logprobs(entries, offset=0 if echoed else offset)
    return [fmt.sse(fmt.completion_chunk(plan.head(), c.index, text, event.finish_reason, lp))]


def _finish_chunk(plan: Plan, index: int, reason: str) -> dict:
    if plan.chat:
        return fmt.chat_chunk(plan.head(), index, {}, reason, None)
    return fmt.completion_chunk(plan.head(), index, "", reason, None)


class EventStream(StreamingResponse):
    """An SSE response that stops its producer the moment the client goes away (uvicorn's send() is silent after
    a disconnect, so waiting for a failed write would let the engine keep generating)."""

    def __init__(self, chunks):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        pump = asyncio.ensure_future(self._pump(send))
        gone = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, gone):
                task.cancel()
            await asyncio.gather(pump, gone, return_exceptions=True)
            await self.body_iterator.aclose()  # runs the producer's finally: engine jobs closed, request recorded

    async def _pump(self, send) -> None:
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
        except Exception as e:  # never a silent truncation, even for a bug of ours
            log.exception("stream failed")
            tail = fmt.error_event(f"internal error: {type(e).__name__}", "internal_error") + fmt.DONE
            await send({"type": "http.response.body", "body": tail.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
