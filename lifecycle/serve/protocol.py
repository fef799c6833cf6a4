"""What an engine and the front ends (REST, gRPC) agree on: requests, streamed events, and the errors an engine
raises before its first event. Front ends never touch torch; engines never touch HTTP."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

# Why a generation ended. "timeout": its deadline passed; "cancelled": the client went away; "error": the engine
# failed mid-generation (Event.error says why).
FINISH_REASONS = ("stop", "length", "timeout", "cancelled", "error")


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request; front ends check ranges, engines trust them."""
    max_tokens: int = 16
    temperature: float = 1.0      # 0: greedy
    top_p: float = 1.0            # in (0, 1]
    top_k: int = 0                # 0: off
    stop: tuple[str, ...] = ()    # generation ends before the first occurrence of any; the text never contains it
    seed: int | None = None       # same seed, same request -> same tokens (per request, whatever the batch)
    logprobs: int | None = None   # None: no log-probs; k >= 0: each token's log-prob and the k most likely tokens
    echo: bool = False            # with logprobs: the prompt tokens' log-probs come first (Event.prompt_logprobs)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: Sampling
    model: str                    # the base model's name or a loaded adapter's name (Engine.model_names())
    deadline: float | None = None  # time.monotonic() past which the job is aborted with finish_reason "timeout"
    request_id: str = ""


@dataclass
class TokenLogprob:
    token: str                    # the token's text as the tokenizer decodes it alone
    logprob: float | None         # None only for the first prompt token (nothing precedes it)
    top: dict[str, float] = field(default_factory=dict)  # the k most likely tokens at this position


@dataclass
class Event:
    """One step of a generation. `text` is the new text (it may be empty while a stop sequence is still possible);
    the last event of every generation has a finish_reason."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token in token_ids, when requested
    prompt_logprobs: list[TokenLogprob] | None = None           # first event only, when echo and logprobs
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0    # so far, cumulative


class EngineError(Exception):
    """A request the engine refuses before generating; front ends map each kind to a status."""


class Overloaded(EngineError):
    """Running + queued jobs are at the limit: HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class ModelNotFound(EngineError):
    """No base or adapter of that name: HTTP 404 model_not_found, gRPC NOT_FOUND."""


class ContextTooLong(EngineError):
    """Prompt (+ max_tokens) over the context: HTTP 400 naming both numbers, gRPC INVALID_ARGUMENT."""


class InvalidPrompt(EngineError):
    """An empty prompt or a token id outside the vocabulary: HTTP 400, gRPC INVALID_ARGUMENT."""


class NoChatTemplate(EngineError):
    """The model's tokenizer has no chat template: HTTP 400, never 500."""


class NotReady(EngineError):
    """Still loading, draining or failed to load: HTTP 503, gRPC UNAVAILABLE."""


class Engine(Protocol):
    """The one interface both front ends drive; lifecycle.serve.engine is the real one, lifecycle.serve.testing a
    deterministic stand-in for front-end tests."""

    context_length: int           # the most tokens (prompt + completion) a request may use

    @property
    def ready(self) -> bool: ...

    def model_names(self) -> list[str]: ...       # the base first, then loaded adapters

    def stats(self) -> dict[str, int]: ...       # {"running": n, "queued": m}

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def render_chat(self, messages: list[dict], model: str | None = None) -> list[int]: ...
    # `model`'s chat template (an adapter may carry its own), else the base's; raises NoChatTemplate

    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream events (an async generator). A refused request raises its EngineError from the first `__anext__`,
        before any event; closing the iterator (aclose, or cancelling the task that iterates it) aborts the job
        within one decode step and frees its slot."""
        ...

    async def load_adapter(self, name: str, path: str) -> None: ...   # raises ModelNotFound / EngineError

    async def unload_adapter(self, name: str) -> None: ...

    async def start(self) -> None: ...           # load the model (ready becomes True on success)

    async def stop(self) -> None: ...            # abort everything still running and free the model
