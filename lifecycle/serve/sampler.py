"""Choosing each job's next token, and the log-probs reported beside it.

Log-probs are log_softmax of the model's raw logits, before temperature, top-k and top-p: they describe the model, not
the sampling settings, which is what scoring clients (lm-evaluation-harness) sum.
"""
from __future__ import annotations

import secrets
from typing import Callable

import torch

from lifecycle.serve.protocol import Sampling, TokenLogprob


def make_generator(seed: int | None) -> torch.Generator:
    """A per-request generator: the same seed draws the same tokens whatever else shares the batch."""
    return torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Each row's argmax, (rows, V) -> rows ints. Float32 on the CPU goes through numpy's vectorised argmax: torch's
    CPU argmax is a scalar loop, ~15 us a row of 8,192 (100 us for 8 rows) against numpy's ~1.3 us (5 us). Both
    return the first maximum, and the first NaN where there is one."""
    if logits.dtype == torch.float32 and logits.device.type == "cpu" and not logits.requires_grad:
        return logits.numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


def choose(logits: torch.Tensor | None, greedy: int, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token from one row of logits (V,); `greedy` is its argmax, computed for the whole batch at once.
    A greedy request (temperature 0) never reads `logits`, so the caller may pass None for it."""
    if sampling.temperature == 0:
        return greedy
    scores = logits.float() / sampling.temperature
    if 0 < sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        scores = _top_p(scores, sampling.top_p)
    # Sampled on the CPU so one generator serves every device the same way.
    probs = torch.softmax(scores, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities reach `top_p` (at least one)."""
    ordered, index = torch.sort(scores, descending=True)
    probs = torch.softmax(ordered, dim=-1)
    drop = probs.cumsum(-1) - probs > top_p  # the mass before each token already reaches top_p
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(0, index, ordered)


class TokenTexts:
    """Each token's text as the tokenizer decodes it alone, cached (log-prob entries name tokens by text)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        text = self.cache.get(token)
        if text is None:
            text = self.cache[token] = self.tokenizer.decode([token])
        return text


def token_logprob(logprobs: torch.Tensor, token: int, k: int, text: Callable[[int], str]) -> TokenLogprob:
    """The log-prob of `token` and the k most likely tokens, from one row of log-probs (V,)."""
    top = {}
    if k > 0:
        values, ids = torch.topk(logprobs, k)
        top = _top_dict(values.tolist(), ids.tolist(), text)
    return TokenLogprob(text(token), float(logprobs[token]), top)


def prompt_logprobs(logprobs: torch.Tensor, ids: list[int], k: int, text: Callable[[int], str]) -> list[TokenLogprob]:
    """Each prompt token's log-prob given the tokens before it, from the prefill's log-probs (L, V); first: None."""
    targets = torch.tensor(ids[1:], device=logprobs.device)
    chosen = logprobs[:-1].gather(1, targets[:, None])[:, 0].tolist()  # (L - 1,): position i predicts token i + 1
    tops = [{}] * len(chosen)
    if k > 0:
        values, top_ids = torch.topk(logprobs[:-1], k)  # (L - 1, k)
        tops = [_top_dict(v, i, text) for v, i in zip(values.tolist(), top_ids.tolist())]
    first = TokenLogprob(text(ids[0]), None, {})
    return [first, *(TokenLogprob(text(t), lp, top) for t, lp, top in zip(ids[1:], chosen, tops))]


def _top_dict(values: list[float], ids: list[int], text: Callable[[int], str]) -> dict[str, float]:
    top = {}
    for value, token in zip(values, ids):
        top.setdefault(text(token), value)  # two ids may decode alike (partial UTF-8): keep the likelier
    return top
