"""OpenAI request bodies: strict pydantic models (no "10" -> 10 coercion), then range checks against the server's
limits. Every failure is an ApiError 400 naming `param`, never a 422 or a 500."""
from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lifecycle.serve.limits import ApiError
from lifecycle.serve.protocol import Sampling

ROLES = ("system", "user", "assistant", "tool")
TOKEN_ID_MAX = 2 ** 31 - 1
Finite = Field(default=None, allow_inf_nan=False)


class _Body(BaseModel):
    # strict: wrong JSON types are errors, not coerced; extra: OpenAI clients send fields we do not use
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Common(_Body):
    model: str | None = None          # None: the base model
    n: int = 1
    max_tokens: int | None = None     # None: default_max_tokens, clamped to what the context leaves
    temperature: float | None = Finite
    top_p: float | None = Finite
    top_k: int = 0                    # vLLM's extension; 0: off
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None


class ChatMessage(_Body):
    role: Literal[ROLES]
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


UNION_HINTS = {"prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
               "stop": "a string or a list of strings"}
NESTED = {"role", "content", "include_usage"}


def parse(raw: bytes, model: type[_Body]) -> _Body:
    """Validate a request body; 400 naming the first offending parameter."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        kind = {list: "an array", type(None): "null", str: "a string", bool: "a boolean"}.get(type(body), "a number")
        raise ApiError(400, f"the body must be a JSON object, not {kind}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(err["loc"])
        hint = UNION_HINTS.get(param)
        message = f"{param} must be {hint}" if hint else f"{param}: {err['msg']}"
        raise ApiError(400, message, param=param, code="invalid_type" if err["type"] != "missing" else "missing")


def _param(loc: tuple) -> str:
    """`messages[0].content` from pydantic's ('messages', 0, 'content'); union member tags are dropped."""
    name = str(loc[0])
    for part in loc[1:]:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in NESTED:
            name += f".{part}"
        else:
            break
    return name


def check_common(req: _Common, limits) -> None:
    """Ranges every generation request shares (limits: the app's RestSettings)."""
    _within("n", req.n, 1, limits.max_n)
    max_tokens = requested_max_tokens(req)
    if max_tokens is not None:
        _within("max_tokens", max_tokens, 1, limits.max_tokens_cap)
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise ApiError(400, "temperature must be between 0 and 2", param="temperature", code="out_of_range")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise ApiError(400, "top_p must be in (0, 1]", param="top_p", code="out_of_range")
    _within("top_k", req.top_k, 0, 1 << 20)
    stops = stop_list(req.stop)
    if len(stops) > limits.max_stop:
        raise ApiError(400, f"stop has {len(stops)} sequences; at most {limits.max_stop} are allowed",
                       param="stop", code="out_of_range")
    if any(not s for s in stops):
        raise ApiError(400, "stop sequences must not be empty", param="stop")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")


def check_completion(req: CompletionRequest, limits) -> None:
    """Ranges of /v1/completions on top of check_common."""
    check_common(req, limits)
    if req.logprobs is not None:
        _within("logprobs", req.logprobs, 0, limits.max_logprobs)
    items = prompt_items(req.prompt)
    if not items or any(len(x) == 0 for x in items):
        raise ApiError(400, "prompt must not be empty", param="prompt")
    if len(items) > limits.max_prompts:
        raise ApiError(400, f"prompt has {len(items)} prompts; at most {limits.max_prompts} are allowed",
                       param="prompt", code="out_of_range")
    if any(not 0 <= t <= TOKEN_ID_MAX for x in items if isinstance(x, list) for t in x):
        raise ApiError(400, "prompt token ids must be non-negative 32-bit integers", param="prompt")


def prompt_items(prompt: str | list) -> list[str | list[int]]:
    """The prompts of a completion request, each a string or a token-id list ([] stays empty)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


def check_chat(req: ChatRequest, limits) -> None:
    """Ranges of /v1/chat/completions on top of check_common."""
    check_common(req, limits)
    if not req.messages:
        raise ApiError(400, "messages must not be empty", param="messages")
    if req.top_logprobs is not None:
        _within("top_logprobs", req.top_logprobs, 0, limits.max_logprobs)
        if not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def _within(param: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ApiError(400, f"{param} must be between {low} and {high}, got {value}", param=param,
                       code="out_of_range")


def stop_list(stop: str | list[str] | None) -> list[str]:
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


def sampling(req: _Common, max_tokens: int, logprobs: int | None, echo: bool, seed: int | None) -> Sampling:
    """The engine's Sampling for one choice of a validated request."""
    return Sampling(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k, stop=tuple(stop_list(req.stop)),
                    seed=seed, logprobs=logprobs, echo=echo)


def requested_max_tokens(req: _Common) -> int | None:
    """max_tokens, or chat's newer max_completion_tokens."""
    if isinstance(req, ChatRequest) and req.max_tokens is None:
        return req.max_completion_tokens
    return req.max_tokens
