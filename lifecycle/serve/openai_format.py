"""OpenAI response bodies and stream chunks, for the legacy completions and the chat API.

Legacy log-probs are what lm-evaluation-harness `local-completions` reads: `tokens`, `token_logprobs` (None for the
first prompt token), `top_logprobs` (one `{token: logprob}` per position; like vLLM, the chosen token is always in
it, so a greedy check compares against the real maximum) and `text_offset` (character offsets in `text`)."""
from __future__ import annotations

import json

from lifecycle.serve.fanout import Choice
from lifecycle.serve.protocol import TokenLogprob

DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def legacy_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict:
    """The completions API's log-probs object for `entries`, text offsets starting at `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e.token)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append(None if e.logprob is None else {**e.top, e.token: e.logprob})
        out["text_offset"].append(offset)
        offset += len(e.token)
    return out


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """The chat API's log-probs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def one(token: str, logprob: float | None) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top.items()]}
                        for e in entries]}


def completion_text(c: Choice, echo: bool) -> str:
    return c.prompt_text + c.text if echo else c.text


def completion_choice_logprobs(c: Choice, echo: bool) -> dict:
    """Echoed prompt tokens first (when echo), then the generated ones."""
    return legacy_logprobs(((c.prompt_logprobs or []) if echo else []) + c.logprobs)


def completion_body(rid: str, created: int, model: str, choices: list[Choice], echo: bool, logprobs: bool,
                    use: dict) -> dict:
    """A whole /v1/completions answer."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "usage": use,
            "choices": [{"index": c.index, "text": completion_text(c, echo), "finish_reason": c.finish_reason,
                         "logprobs": completion_choice_logprobs(c, echo) if logprobs else None}
                        for c in choices]}


def chat_body(rid: str, created: int, model: str, choices: list[Choice], logprobs: bool, use: dict) -> dict:
    """A whole /v1/chat/completions answer."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "usage": use,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": chat_logprobs(c.logprobs) if logprobs else None,
                         "finish_reason": c.finish_reason} for c in choices]}


def completion_chunk(head: dict, index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {**head, "object": "text_completion",
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_chunk(head: dict, index: int, delta: dict, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {**head, "object": "chat.completion.chunk",
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(head: dict, chat: bool, use: dict) -> dict:
    """The last chunk when stream_options.include_usage: no choices, the whole request's usage."""
    return {**head, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [], "usage": use}


def error_event(message: str, code: str = "engine_error") -> str:
    """An error inside a stream that already answered 200."""
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": code}})
