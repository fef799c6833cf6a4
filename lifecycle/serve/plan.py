"""From a validated OpenAI request to the engine jobs that answer it: the model, tokenized prompts, the context
check (both numbers in the message), max_tokens defaults and one GenerationRequest per prompt x n."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from lifecycle.serve.fanout import Choice
from lifecycle.serve.limits import ApiError
from lifecycle.serve.names import check_model
from lifecycle.serve.openai_api import ChatRequest, CompletionRequest, prompt_items, requested_max_tokens, sampling
from lifecycle.serve.protocol import GenerationRequest, NoChatTemplate


@dataclass
class Plan:
    """What a generation route runs and how it answers."""
    rid: str
    model: str
    chat: bool
    prompts: list[tuple[str, list[int]]]    # (text, token ids) per prompt
    requests: list[GenerationRequest]       # prompt i, choice j -> requests[i * n + j]
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: bool
    deadline: float                          # time.monotonic()
    created: int

    def choices(self) -> list[Choice]:
        return [Choice(k, *self.prompts[k // self.n]) for k in range(len(self.requests))]

    def head(self) -> dict:
        """Fields every stream chunk repeats."""
        return {"id": self.rid, "created": self.created, "model": self.model}


def completion_plan(req: CompletionRequest, engine, settings) -> Plan:
    """Jobs for /v1/completions."""
    model = check_model(req.model or engine.model_names()[0], engine.model_names())
    prompts = [_tokenized(engine, p) for p in prompt_items(req.prompt)]
    return _plan("cmpl", model, False, prompts, req, engine, settings, req.logprobs, req.echo)


def chat_plan(req: ChatRequest, engine, settings) -> Plan:
    """Jobs for /v1/chat/completions (the model's chat template renders the messages)."""
    model = check_model(req.model or engine.model_names()[0], engine.model_names())
    messages = [m.model_dump() for m in req.messages]
    try:
        ids = engine.render_chat(messages, model)
    except NoChatTemplate as e:
        raise ApiError(400, str(e), param="messages", code="no_chat_template") from None
    text = "\n".join(m["content"] for m in messages)
    k = (req.top_logprobs or 0) if req.logprobs else None
    return _plan("chatcmpl", model, True, [(text, ids)], req, engine, settings, k, False)


def _plan(kind, model, chat, prompts, req, engine, settings, logprobs, echo) -> Plan:
    deadline = time.monotonic() + settings.request_timeout_s
    rid = f"{kind}-{uuid.uuid4().hex}"
    requests = []
    for text, ids in prompts:
        max_tokens = _max_tokens(len(ids), requested_max_tokens(req), engine.context_length, settings)
        for j in range(req.n):
            seed = None if req.seed is None else req.seed + j  # n choices differ, each reproducible
            # Each token's log-prob always (k=0 when not asked: the answer then shows none), so the usage log's
            # mean_logprob tells the monitor how sure the model was of every answer.
            lp = 0 if logprobs is None else logprobs
            requests.append(GenerationRequest(ids, sampling(req, max_tokens, lp, echo, seed), model,
                                              deadline, f"{rid}-{len(requests)}"))
    return Plan(rid, model, chat, prompts, requests, req.n, req.stream,
                bool(req.stream_options and req.stream_options.include_usage), echo, logprobs is not None,
                deadline, int(time.time()))


def _tokenized(engine, prompt: str | list[int]) -> tuple[str, list[int]]:
    """(text, ids) of one prompt given as text or as token ids."""
    if isinstance(prompt, str):
        return prompt, engine.encode(prompt)
    try:
        return engine.decode(prompt), list(prompt)
    except (ValueError, IndexError, OverflowError, TypeError):
        raise ApiError(400, "prompt holds token ids this model's tokenizer does not know", param="prompt") from None


def _max_tokens(prompt_len: int, asked: int | None, context: int, settings) -> int:
    """max_tokens for a prompt: as asked if it fits (else 400 with both numbers); when not asked, the default
    clamped to what the context leaves."""
    if prompt_len >= context:
        raise ApiError(400, f"the prompt ({prompt_len} tokens) leaves no room in the context length ({context})",
                       param="prompt", code="context_length_exceeded")
    if asked is None:
        return min(settings.default_max_tokens, context - prompt_len)
    if prompt_len + asked > context:
        raise ApiError(400, f"prompt ({prompt_len} tokens) + max_tokens ({asked}) = {prompt_len + asked} is over "
                            f"the context length ({context})", param="max_tokens", code="context_length_exceeded")
    return asked
