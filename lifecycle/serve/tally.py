"""One generation request's bookkeeping: Prometheus (ServeMetrics) and the usage meter, written exactly once per
request whatever way it ends, so the load tests' invariant (sent = ok + 429 + 503 + cancelled + timed out) holds."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from lifecycle.serve.fanout import Choice, Fanout
from lifecycle.serve.limits import FRONTEND, outcome_of
from lifecycle.serve.usage import UsageRecord, mean_logprob, request_stats

# The HTTP status a usage row carries for a streamed request that answered 200 but did not end well.
STREAM_STATUS = {"timeout": 504, "error": 500, "cancelled": 499}


@dataclass
class Tally:
    route: str
    key_id: str
    started: float = field(default_factory=time.monotonic)
    model: str = "-"                 # a served name only: metric label values stay bounded
    status: int = 200
    outcome: str | None = None       # None: from status
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float | None = None
    tpot: float | None = None
    mean_logprob: float | None = None
    stats: dict | None = None
    text: dict | None = None
    request_id: str | None = None    # the id the client got back, so feedback can name it

    def fold(self, prompts: list[tuple[str, list[int]]], choices: list[Choice], fan: Fanout | None) -> None:
        """Tokens, timings, log-probs and drift statistics from what the jobs produced."""
        self.prompt_tokens = sum(len(ids) for _, ids in prompts)
        self.completion_tokens = sum(c.completion_tokens for c in choices)
        reasons = [c.finish_reason for c in choices if c.finish_reason]
        self.finish_reason = reasons[0] if reasons else None
        if fan is not None and fan.first_token_at is not None:
            self.ttft = fan.first_token_at - self.started
            per_choice = max(c.completion_tokens for c in choices)
            if per_choice > 1:
                self.tpot = (fan.last_token_at - fan.first_token_at) / (per_choice - 1)
        self.mean_logprob = mean_logprob(e for c in choices for e in c.logprobs)
        if prompts and choices:
            (prompt, ids), out = prompts[0], choices[0]
            self.stats = request_stats(prompt, out.text, ids, out.token_ids)
            self.text = {"prompt": prompt, "output": out.text}

    def stream_ended(self, reason: str | None) -> None:
        """A stream that answered 200 ended with `reason` (None: cut off before its end)."""
        reason = reason or "cancelled"
        self.outcome = {"timeout": "timeout", "error": "error", "cancelled": "cancelled"}.get(reason, "ok")
        self.status = STREAM_STATUS.get(reason, 200)


def record(tally: Tally, metrics, meter, log_text: bool) -> None:
    """Write the request into Prometheus and the usage meter."""
    seconds = time.monotonic() - tally.started
    metrics.request(FRONTEND, tally.route, tally.model, tally.outcome or outcome_of(tally.status), seconds)
    metrics.tokens(tally.model, tally.prompt_tokens, tally.completion_tokens)
    if tally.ttft is not None:
        metrics.ttft.labels(FRONTEND).observe(tally.ttft)
    if tally.tpot is not None:
        metrics.tpot.labels(FRONTEND).observe(tally.tpot)
    if meter is not None:
        meter.record(UsageRecord(
            key_id=tally.key_id, model=tally.model, frontend=FRONTEND, route=tally.route, status=tally.status,
            prompt_tokens=tally.prompt_tokens, completion_tokens=tally.completion_tokens, latency_ms=seconds * 1000,
            ttft_ms=None if tally.ttft is None else tally.ttft * 1000, finish_reason=tally.finish_reason,
            mean_logprob=tally.mean_logprob, stats=tally.stats, text=tally.text if log_text else None,
            request_id=tally.request_id))
