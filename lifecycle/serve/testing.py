"""A deterministic stand-in for the engine, for testing the front ends on 2 cores (TESTPLAN: "a fake engine").

It speaks the same protocol as lifecycle.serve.engine.LocalEngine: admission limits, queueing, deadlines,
cancellation, stop sequences, log-probs and adapters by name. Its "tokenizer" maps each character to its code
point and its "model" spells `text` in a loop, one character per token, `token_delay` seconds apart.
"""
from __future__ import annotations

import asyncio
import math
import random
import time
from typing import AsyncIterator

from lifecycle.serve.protocol import (
    ContextTooLong, Event, GenerationRequest, ModelNotFound, NoChatTemplate, NotReady, Overloaded, TokenLogprob,
)

EOS = 0


class FakeEngine:
    """Deterministic tokens with a configurable delay, load time and failure point."""

    def __init__(self, name: str = "fake", adapters: tuple[str, ...] = (), text: str = "hello world ",
                 token_delay: float = 0.0, load_delay: float = 0.0, fail_after: int | None = None,
                 fail_load: bool = False, max_batch_size: int = 4, max_queue: int = 4, context_length: int = 256,
                 chat_template: bool = True):
        self.name, self.text, self.token_delay, self.load_delay = name, text, token_delay, load_delay
        self.fail_after, self.fail_load, self.chat_template = fail_after, fail_load, chat_template
        self.max_batch_size, self.max_queue, self.context_length = max_batch_size, max_queue, context_length
        self.adapters = dict.fromkeys(adapters, "")
        self._ready, self._running, self._queued = False, 0, 0
        self._slots: asyncio.Semaphore | None = None
        self.cancelled = 0  # jobs whose consumer went away before they finished

    @property
    def ready(self) -> bool:
        return self._ready

    def model_names(self) -> list[str]:
        return [self.name, *self.adapters]

    def stats(self) -> dict[str, int]:
        return {"running": self._running, "queued": self._queued}

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i != EOS)

    def render_chat(self, messages: list[dict], model: str | None = None) -> list[int]:
        if not self.chat_template:
            raise NoChatTemplate(f"model {self.name} has no chat template; use /v1/completions with a plain prompt")
        return self.encode("".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>")

    async def start(self) -> None:
        await asyncio.sleep(self.load_delay)
        if self.fail_load:
            raise RuntimeError("fake engine: load failed (fail_load=True)")
        self._slots = asyncio.Semaphore(self.max_batch_size)
        self._ready = True

    async def stop(self) -> None:
        self._ready = False

    async def load_adapter(self, name: str, path: str) -> None:
        self.adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise ModelNotFound(f"no adapter named {name!r} is loaded")
        del self.adapters[name]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        self._admit(request)
        self._queued += 1
        try:
            await self._slots.acquire()
        finally:
            self._queued -= 1
        self._running += 1
        finished = False
        try:
            async for event in self._steps(request):
                finished = event.finish_reason is not None
                yield event
        finally:
            self._running -= 1
            self._slots.release()
            if not finished:
                self.cancelled += 1

    def _admit(self, request: GenerationRequest) -> None:
        if not self._ready:
            raise NotReady("the model is not loaded (still loading, draining or failed)")
        if request.model not in self.model_names():
            raise ModelNotFound(f"model {request.model!r} is not served; served: {', '.join(self.model_names())}")
        n, m = len(request.prompt_ids), request.sampling.max_tokens
        if n + m > self.context_length:
            raise ContextTooLong(f"prompt ({n} tokens) + max_tokens ({m}) = {n + m} is over the context length "
                                 f"({self.context_length})")
        if self._running + self._queued >= self.max_batch_size + self.max_queue:
            raise Overloaded(f"{self._running} running and {self._queued} queued: at the limit", retry_after=1.0)

    async def _steps(self, request: GenerationRequest) -> AsyncIterator[Event]:
        s, n = request.sampling, len(request.prompt_ids)
        rng = random.Random(s.seed)
        prompt_lp = self._prompt_logprobs(request.prompt_ids) if s.echo and s.logprobs is not None else None
        produced, pending = "", ""
        for i in range(s.max_tokens):
            if request.deadline is not None and time.monotonic() > request.deadline:
                yield Event(finish_reason="timeout", prompt_tokens=n, completion_tokens=i)
                return
            await asyncio.sleep(self.token_delay)
            if self.fail_after is not None and i >= self.fail_after:
                yield Event(finish_reason="error", error="fake engine: injected failure", prompt_tokens=n,
                            completion_tokens=i)
                return
            char = self.text[i % len(self.text)] if s.temperature == 0 or s.seed is None else rng.choice(self.text)
            lps = [TokenLogprob(char, -1.0, {char: -1.0})] if s.logprobs is not None else []
            pending += char
            cut = _stop_cut(produced + pending, s.stop)
            if cut is not None:
                yield Event(text=cut[len(produced):], token_ids=[ord(char)], logprobs=lps, prompt_logprobs=prompt_lp,
                            finish_reason="stop", prompt_tokens=n, completion_tokens=i + 1)
                return
            last = i + 1 == s.max_tokens
            release = len(pending) if last else _releasable(pending, s.stop)
            emit, pending = pending[:release], pending[release:]
            produced += emit
            yield Event(text=emit, token_ids=[ord(char)], logprobs=lps, prompt_logprobs=prompt_lp,
                        finish_reason="length" if last else None, prompt_tokens=n, completion_tokens=i + 1)
            prompt_lp = None

    def _prompt_logprobs(self, ids: list[int]) -> list[TokenLogprob]:
        return [TokenLogprob(chr(t), None if j == 0 else -math.log(2), {}) for j, t in enumerate(ids)]


def _stop_cut(text: str, stops: tuple[str, ...]) -> str | None:
    """The text before the earliest stop sequence, or None if none occurs."""
    hits = [text.find(s) for s in stops if s and s in text]
    return text[:min(hits)] if hits else None


def _releasable(pending: str, stops: tuple[str, ...]) -> int:
    """How many leading characters of `pending` can no longer be the start of a stop sequence."""
    for start in range(len(pending)):
        tail = pending[start:]
        if any(s.startswith(tail) for s in stops if s):
            return start
    return len(pending)
