"""One HTTP request's engine jobs (prompts x n) run side by side; their events arrive on one queue. Closing the
fan-out cancels every job, which closes its engine iterator and so frees its slot (protocol.Engine.generate)."""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from lifecycle.serve.protocol import Event, EngineError, GenerationRequest, TokenLogprob

DONE = object()  # a job's end-of-events marker on the queue
WAIT = object()  # Fanout.poll: nothing queued yet


class ClientGone(Exception):
    """The client closed the connection before the answer was complete."""


class Deadline(Exception):
    """The request's time limit passed."""


@dataclass
class Choice:
    """Everything one job produced, folded from its events."""
    index: int
    prompt_text: str
    prompt_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    error: str | None = None
    completion_tokens: int = 0

    def add(self, event: Event) -> None:
        self.text += event.text
        self.token_ids += event.token_ids
        self.logprobs += event.logprobs
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        self.completion_tokens = max(self.completion_tokens, event.completion_tokens)
        self.finish_reason = event.finish_reason or self.finish_reason
        self.error = event.error or self.error


class Fanout:
    """Start with `start()`, read with `next()`, always `close()` (idempotent)."""

    def __init__(self, engine, requests: list[GenerationRequest]):
        self.engine, self.requests = engine, requests
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.open = len(requests)
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def start(self) -> "Fanout":
        self.tasks = [asyncio.create_task(self._pump(i, r)) for i, r in enumerate(self.requests)]
        return self

    async def _pump(self, index: int, request: GenerationRequest) -> None:
        events = self.engine.generate(request)
        try:
            async for event in events:
                self.queue.put_nowait((index, event))
        except Exception as e:  # an EngineError refusal, or an engine bug: the consumer decides what it means
            self.queue.put_nowait((index, e))
        finally:
            with contextlib.suppress(Exception):
                await events.aclose()
            self.queue.put_nowait((index, DONE))

    async def next(self) -> tuple[int, Event] | None:
        """The next event of any job, or None once every job has ended; a refusal is raised here."""
        while self.open:
            index, item = await self.queue.get()
            if item is DONE:
                self.open -= 1
                continue
            return self._event(index, item)
        return None

    def poll(self) -> tuple[int, Event] | None | object:
        """next() without waiting: what it would return now, or WAIT if it would have to wait."""
        while self.open and not self.queue.empty():
            index, item = self.queue.get_nowait()
            if item is DONE:
                self.open -= 1
                continue
            return self._event(index, item)
        return WAIT if self.open else None

    def _event(self, index: int, item) -> tuple[int, Event]:
        if isinstance(item, EngineError):
            raise item
        if isinstance(item, Exception):
            item = Event(finish_reason="error", error=f"engine failure: {type(item).__name__}: {item}")
        if item.token_ids:
            self.last_token_at = time.monotonic()
            self.first_token_at = self.first_token_at or self.last_token_at
        return index, item

    async def close(self) -> None:
        """Cancel every job still running and wait until each has let go of its engine slot."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def collect(fanout: Fanout, choices: list[Choice]) -> None:
    """Fold every event into its choice until all jobs end."""
    while (item := await fanout.next()) is not None:
        index, event = item
        choices[index].add(event)


async def wait_disconnect(receive) -> None:
    """Return when the client goes away (call only after the request body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def race(work, receive, deadline: float):
    """Run `work` until it finishes (its result), the client leaves (ClientGone) or `deadline` passes (Deadline);
    in the last two cases `work` is cancelled first."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone() if gone in done else Deadline()
    finally:
        for t in (task, gone):
            t.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)
