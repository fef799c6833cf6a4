"""The hybrid deployment: a small (edge) engine answers, a large (cloud) engine takes what the small one should not.

Escalation rules, either or both: a prompt longer than `escalate_prompt_tokens`, or a small-model answer whose mean
token log-probability is under `escalate_mean_logprob` (the small answer is then generated in full first and
discarded, so that rule costs the small model's time on escalated requests; it is measured in `stats()`).
"""
from __future__ import annotations

import dataclasses
from typing import AsyncIterator

from lifecycle.errors import ConfigError
from lifecycle.serve.protocol import Event, GenerationRequest, ModelNotFound


class HybridEngine:
    """Routes each request between two engines; serves the small engine's model names plus the large base's."""

    def __init__(self, small, large, escalate_prompt_tokens: int | None = None,
                 escalate_mean_logprob: float | None = None):
        if escalate_prompt_tokens is None and escalate_mean_logprob is None:
            raise ConfigError("deploy=hybrid: no escalation rule; set engine.escalate_prompt_tokens and/or "
                              "engine.escalate_mean_logprob")
        self.small, self.large = small, large
        self.escalate_prompt_tokens, self.escalate_mean_logprob = escalate_prompt_tokens, escalate_mean_logprob
        self.routed = {"small": 0, "large": 0, "escalated_after_small": 0}

    @property
    def context_length(self) -> int:
        return min(self.small.context_length, self.large.context_length)

    @property
    def ready(self) -> bool:
        return self.small.ready and self.large.ready

    def model_names(self) -> list[str]:
        return list(dict.fromkeys([*self.small.model_names(), *self.large.model_names()]))

    def stats(self) -> dict[str, int]:
        a, b = self.small.stats(), self.large.stats()
        return {"running": a["running"] + b["running"], "queued": a["queued"] + b["queued"], **self.routed}

    # Both engines share one tokenizer (checked at start), so the small engine's speaks for both.
    def encode(self, text: str) -> list[int]:
        return self.small.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.small.decode(ids)

    def render_chat(self, messages: list[dict], model: str | None = None) -> list[int]:
        return self.small.render_chat(messages, model if model in self.small.model_names() else None)

    async def start(self) -> None:
        await self.small.start()
        await self.large.start()
        probe = "def main():\n    return 0\n"
        if self.small.encode(probe) != self.large.encode(probe):
            raise ConfigError("deploy=hybrid: the small and large models use different tokenizers; a request's "
                              "token ids must mean the same to both (distill or quantize the large model)")

    async def stop(self) -> None:
        await self.small.stop()
        await self.large.stop()

    async def load_adapter(self, name: str, path: str) -> None:
        await self.small.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> None:
        await self.small.unload_adapter(name)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        engine = self._first_choice(request)
        if engine is self.large or self.escalate_mean_logprob is None:
            self.routed["large" if engine is self.large else "small"] += 1
            async for event in engine.generate(self._for(engine, request)):
                yield event
            return
        events = [e async for e in self.small.generate(self._scored(request))]
        if _mean_logprob(events) >= self.escalate_mean_logprob:
            self.routed["small"] += 1
            for event in events:
                yield _strip(event, request)
            return
        self.routed["escalated_after_small"] += 1
        async for event in self.large.generate(self._for(self.large, request)):
            yield event

    def _first_choice(self, request: GenerationRequest):
        """The large engine for long prompts and for names only it serves; else the small one."""
        if request.model not in self.small.model_names():
            if request.model not in self.large.model_names():
                raise ModelNotFound(f"model {request.model!r} is not served; served: {', '.join(self.model_names())}")
            return self.large
        limit = self.escalate_prompt_tokens
        return self.large if limit is not None and len(request.prompt_ids) > limit else self.small

    def _for(self, engine, request: GenerationRequest) -> GenerationRequest:
        """The request under the engine's own base name when it names the other engine's base."""
        if request.model in engine.model_names():
            return request
        return dataclasses.replace(request, model=engine.model_names()[0])

    def _scored(self, request: GenerationRequest) -> GenerationRequest:
        """The request with per-token log-probs switched on (the rule needs them)."""
        if request.sampling.logprobs is not None:
            return request
        return dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, logprobs=0))


def _mean_logprob(events: list[Event]) -> float:
    values = [lp.logprob for e in events for lp in e.logprobs if lp.logprob is not None]
    return sum(values) / len(values) if values else 0.0


def _strip(event: Event, request: GenerationRequest) -> Event:
    """Drop the log-probs the router asked for but the client did not."""
    return event if request.sampling.logprobs is not None else dataclasses.replace(event, logprobs=[])
