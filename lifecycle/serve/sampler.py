"""Choosing each job's next token, and the log-probs reported beside it.

Sampled draws are counter-based: token n of a request draws with the uniform number `uniform(seed, n)`, a pure
function of the request's seed and the token's index. So the same seed draws the same tokens whatever else shares
the batch, and whether its steps ran one per call or several in one C call (Scheduler._run_ahead), which needs the
draw to be the same arithmetic in C (native_step.c's lc_sample) and here. Sampler uses that C code where the native
library builds; otherwise the same rule in torch (equal tokens but where float rounding puts the uniform number on
the boundary between two tokens: the C path sums the weights 16 at a time in float, then in float64, torch's cumsum
all in float64).

Log-probs are log_softmax of the model's raw logits, before temperature, top-k and top-p: they describe the model, not
the sampling settings, which is what scoring clients (lm-evaluation-harness) sum.
"""
from __future__ import annotations

import logging
import secrets
import threading
from typing import Callable

import torch

from lifecycle.serve.protocol import Sampling, TokenLogprob

log = logging.getLogger(__name__)
MASK64 = (1 << 64) - 1


def job_seed(seed: int | None) -> int:
    """A request's draw stream: its own seed (as an unsigned 64-bit number), else a random one."""
    return seed & MASK64 if seed is not None else secrets.randbits(64)


def _mix64(z: int) -> int:
    """SplitMix64's output function (lc_uniform's)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def uniform(seed: int, counter: int) -> float:
    """Draw `counter` of stream `seed`: a float in [0, 1) with 53 random bits, the same number lc_uniform gives."""
    z = _mix64((_mix64(seed) + (counter + 1) * 0x9E3779B97F4A7C15) & MASK64)
    return (z >> 11) * 2.0 ** -53


class Sampler:
    """The sampled draws of one server: in C where the native library builds and `native` allows it (True or
    "auto", as deploy.engine.native), else in torch; fixed for the server's life, so a seed's tokens never depend
    on which was used per step."""

    def __init__(self, native: bool | str = "auto"):
        self.lib = None
        if native:
            from lifecycle.serve import native as native_step
            try:
                self.lib = native_step.library()
            except native_step.NativeUnavailable as e:
                log.info("sampling: in torch (%s)", e)
        self.scratch = threading.local()  # lc_sample's work buffer (.work) for a vocabulary of .vocab, per thread

    @property
    def native(self) -> bool:
        return self.lib is not None

    def draw(self, logits: torch.Tensor, sampling: Sampling, seed: int, counter: int) -> int:
        """Token `counter` of a request sampled with `sampling` (temperature > 0) and stream `seed`, from its row of
        logits (V,). Raises ValueError when nothing can be drawn (a NaN or +inf logit, or every logit -inf)."""
        if self.lib is None:
            return _draw_torch(logits, sampling, seed, counter)
        row = logits.detach().to("cpu", torch.float32).contiguous()
        vocab = row.shape[-1]
        if getattr(self.scratch, "vocab", None) != vocab:
            self.scratch.work, self.scratch.vocab = torch.empty(self.lib.lc_sample_floats(vocab)), vocab
        work = self.scratch.work
        token = self.lib.lc_sample(row.data_ptr(), vocab, sampling.temperature, sampling.top_k, sampling.top_p,
                                   seed, counter, work.data_ptr())
        if token < 0:
            raise ValueError(NOTHING_TO_DRAW)
        return token


NOTHING_TO_DRAW = "no token can be drawn: the logits hold NaN or +inf, or are all -inf"


def _draw_torch(logits: torch.Tensor, sampling: Sampling, seed: int, counter: int) -> int:
    """lc_sample's rule in torch: the weights softmax(logits / temperature) keeps (top-k, top-p), the first token,
    in index order, whose running sum of kept weights passes uniform(seed, counter) times their total."""
    scores = logits.detach().float().cpu()
    if torch.isnan(scores).any() or torch.isposinf(scores).any() or torch.isneginf(scores).all():
        raise ValueError(NOTHING_TO_DRAW)
    if 0 < sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    weights = torch.exp((scores - scores.max()) / sampling.temperature).double()
    if sampling.top_p < 1.0:
        ordered, index = torch.sort(weights, descending=True, stable=True)
        drop = ordered.cumsum(-1) - ordered > sampling.top_p * weights.sum()  # the mass before already passes
        weights = weights.scatter(0, index, ordered.masked_fill(drop, 0.0))
    running = weights.cumsum(-1)
    target = uniform(seed, counter) * float(running[-1])
    token = int(torch.searchsorted(running, torch.tensor([target], dtype=torch.float64), right=True)[0])
    return min(token, int(weights.nonzero()[-1]))  # rounding may leave the target at the very end


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Each row's argmax, (rows, V) -> rows ints. Float32 on the CPU goes through numpy's vectorised argmax: torch's
    CPU argmax is a scalar loop, ~15 us a row of 8,192 (100 us for 8 rows) against numpy's ~1.3 us (5 us). Both
    return the first maximum, and the first NaN where there is one."""
    if logits.dtype == torch.float32 and logits.device.type == "cpu" and not logits.requires_grad:
        return logits.numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


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
