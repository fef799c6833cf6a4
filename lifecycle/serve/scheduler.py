"""The decode loop: one thread admitting queued jobs between steps and decoding every running job together.

Each step: run queued control calls (adapter loads), drop cancelled and expired jobs, prefill newcomers into free
slots, then one forward per adapter group over all of its rows. Events go to the asyncio side through each job's
`emit`; the engine's emit only queues them, and the scheduler's `flush` hands each phase's events over at once (one
wake-up of the event loop per step, not one per token) before the next forward. A failing job ends with
finish_reason "error" and the rest go on.

Per token outside the forward this loop does Python-int work only for a greedy request: the argmax of the whole
batch through numpy (sampler.greedy_tokens), no per-row logits view unless the request samples or wants log-probs.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from lifecycle.serve.batch import Batch, merge
from lifecycle.serve.detok import Detokenizer, StopMatcher
from lifecycle.serve.protocol import Event, GenerationRequest, NotReady, TokenLogprob
from lifecycle.serve.sampler import NOTHING_TO_DRAW, greedy_tokens, prompt_logprobs, token_logprob
from lifecycle.serve.served import ServedModel

log = logging.getLogger(__name__)

RUN_AHEAD_MAX = 16  # steps taken in one call at most (Scheduler._run_ahead)


@dataclass(eq=False)
class Job:
    """One generation as the loop sees it."""
    request: GenerationRequest
    emit: Callable[[Event], None]     # thread-safe hand-off to the consumer (may wait for Scheduler.flush)
    detok: Detokenizer
    stops: StopMatcher
    seed: int                         # its draw stream (sampler.job_seed); token n draws with counter n
    cancelled: bool = False           # set by the consumer's side when it goes away
    admitted: bool = False            # out of the queue, holding a slot
    done: bool = False
    completion: int = 0               # tokens generated so far
    last: int = -1                    # the token to feed at the next decode step
    started: float = field(default_factory=time.monotonic)
    events: object = None             # the consumer's asyncio.Queue (only the event loop's thread touches it)

    @property
    def left(self) -> int:
        """Tokens it may still generate (max_tokens not yet reached)."""
        return self.request.sampling.max_tokens - self.completion

    def gone(self, now: float) -> bool:
        """Cancelled, or past its deadline at `now` (a sweep over many jobs reads the clock once)."""
        deadline = self.request.deadline
        return self.cancelled or (deadline is not None and now > deadline)


@dataclass(eq=False)
class Group:
    """The jobs of one model name (base or adapter), decoded by one forward per step. jobs[r] owns row r of the
    batch; a finished job keeps its row (done, its outputs ignored) until a newcomer takes the row over
    (Batch.adopt: that row's storage rewritten) or the group is compacted (a merge: every live row copied), which
    happens once finished rows are more than half as many as live ones. Rebuilding the batch at every join and
    leave had taken a quarter of the wall time of 64 staggered requests on a 120M Llama (225 merges, 12.7 of
    ~53 s)."""
    jobs: list[Job] = field(default_factory=list)
    batch: Batch | None = None
    step_seconds: float | None = None  # moving average of one decode step's wall time (all rows)

    def live_rows(self) -> list[int]:
        """The rows whose jobs are still running."""
        return [r for r, job in enumerate(self.jobs) if not job.done]


class Scheduler:
    """Owns the model between steps; everything that touches it runs on this thread."""

    def __init__(self, served: ServedModel | None, max_batch_size: int, flush: Callable[[], None] | None = None,
                 run_ahead: float = 0.0):
        """`served` may be None at first: the engine loads the model through `call` (on this thread), then sets it.
        `flush` (optional) delivers the events that jobs' `emit` queued; it runs on this thread after every phase
        of an iteration that may have emitted (and after a failed iteration and at stop). `run_ahead`: seconds
        of steps to take in one call where _run_ahead allows (0: always one step)."""
        self.served, self.max_batch_size, self.run_ahead = served, max_batch_size, run_ahead
        self.flush = flush or _nothing
        self.pending: deque[Job] = deque()
        self.lock = threading.Lock()  # pending is appended on the event loop's thread, drained on this one
        self.groups: dict[str, Group] = {}
        self.controls: deque[tuple[Callable, Future]] = deque()
        self.running = 0
        self.job_seconds = 1.0        # moving average of a job's wall time, for Overloaded's retry_after
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="lifecycle-decode", daemon=True)

    def submit(self, job: Job) -> None:
        with self.lock:
            self.pending.append(job)
        self.wake.set()

    def call(self, fn: Callable) -> Future:
        """Run `fn()` on the loop thread between steps; the future carries its result or exception."""
        future = Future()
        self.controls.append((fn, future))
        self.wake.set()
        return future

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join()

    def drop_model(self, name: str, error: str) -> None:
        """End every queued and running job of model `name` with an error (its adapter is going away)."""
        with self.lock:
            queued = [j for j in self.pending if j.request.model == name]
            for job in queued:
                self.pending.remove(job)
        for job in queued:
            self._finish(job, "error", error=error)
        if name in self.groups:
            self._fail_group(name, error)

    def _run(self) -> None:
        # Grad mode is per thread: off once here rather than a no_grad context per step; control calls (model and
        # adapter loads) run with it on, as they would anywhere else.
        with torch.no_grad():
            while not self.stopping:
                if not (self.pending or self.running or self.controls):
                    self.wake.wait()
                if self.wake.is_set():
                    self.wake.clear()
                try:
                    self._iteration()
                except Exception:  # a bug outside any one job: fail what runs, keep serving
                    log.exception("decode loop step failed")
                    for name in list(self.groups):
                        self._fail_group(name, "internal error in the decode loop (logged by the server)")
                finally:
                    self.flush()
            self._abort_all()
            self.flush()

    def _iteration(self) -> None:
        if self.controls:
            with torch.enable_grad():
                while self.controls:
                    fn, future = self.controls.popleft()
                    try:
                        future.set_result(fn())
                    except Exception as e:
                        future.set_exception(e)
        self._reap()
        if self.pending:
            self._admit()
            self.flush()  # first tokens out before the running groups' step
        for name in list(self.groups):
            self._step(name)
            self.flush()  # this group's tokens out before the next forward

    def _reap(self) -> None:
        """Drop cancelled jobs silently and expired ones with finish_reason "timeout"."""
        now = time.monotonic()
        if self.pending:
            with self.lock:
                gone = [j for j in self.pending if j.gone(now)]
                for job in gone:
                    self.pending.remove(job)
            for job in gone:
                self._finish(job, "timeout")
        for name, group in list(self.groups.items()):
            gone = [j for j in group.jobs if not j.done and j.gone(now)]
            for job in gone:
                self._finish(job, "timeout")
            if gone:
                self._settle(name)

    def _admit(self) -> None:
        """Move queued jobs into free slots, prefilling those of one model together."""
        newcomers: dict[str, list[Job]] = {}
        while self.pending and self.running < self.max_batch_size:
            with self.lock:
                job = self.pending.popleft()
            if job.gone(time.monotonic()):  # it may have arrived after this iteration's _reap
                self._finish(job, "timeout")
                continue
            job.admitted = True
            self.running += 1
            newcomers.setdefault(job.request.model, []).append(job)
        for name, jobs in newcomers.items():
            try:
                self._prefill(name, jobs)
            except Exception as e:
                log.exception("prefill failed for model %s", name)
                for job in jobs:
                    self._finish(job, "error", error=f"{type(e).__name__}: {e}")

    def _prefill(self, name: str, jobs: list[Job]) -> None:
        """Run the prompts, emit each first token, and add the jobs that go on to the model's group."""
        echo = [j.request.sampling.echo and j.request.sampling.logprobs is not None for j in jobs]
        logits, batch = self.served.prefill(name, [j.request.prompt_ids for j in jobs], all_logits=any(echo))
        for job, rows, wants in zip(jobs, logits, echo):
            prompt = None
            if wants:
                lp = torch.log_softmax(rows.float(), dim=-1)  # (L, V)
                prompt = prompt_logprobs(lp, job.request.prompt_ids, job.request.sampling.logprobs,
                                         self.served.text)
            try:
                self._advance(job, rows, -1, greedy_tokens(rows[-1:])[0], prompt=prompt)
            except Exception as e:
                log.exception("request %s failed", job.request.request_id)
                self._finish(job, "error", error=f"{type(e).__name__}: {e}")
        joining = [i for i, job in enumerate(jobs) if not job.done]
        if not joining:
            return
        group = self.groups.setdefault(name, Group())
        free = [r for r, job in enumerate(group.jobs) if job.done]
        for i in list(joining):  # finished jobs' rows first, where the prompt fits before the batch's column
            if free and group.batch.fits(batch, i):
                row = free.pop(0)
                group.batch.adopt(row, batch, i)
                group.jobs[row] = jobs[i]
                joining.remove(i)
        if not joining:
            return
        live = group.live_rows()
        old = [(group.batch, live)] if group.batch is not None else []
        group.jobs = [group.jobs[r] for r in live] + [jobs[i] for i in joining]
        group.batch = merge([*old, (batch, joining)], self._room(name, group))

    def _step(self, name: str) -> None:
        """One decode step for every row of group `name`, or several in one call (_run_ahead) where it may."""
        group = self.groups[name]
        k = self._run_ahead(name, group)
        if group.batch.t + k > group.batch.valid.shape[1]:  # out of columns: one copy either way
            if group.batch.trimmable(group.live_rows()):
                self._compact(name)  # this one drops finished rows and unused leading columns too
            else:
                group.batch.grow(max(k, self._room(name, group)))
        jobs = group.jobs
        finished = [r for r, job in enumerate(jobs) if job.done]
        if finished:  # their rows run on unread; at position 0, so none outgrows the rope table
            group.batch.positions[finished] = 0
        started = time.perf_counter()
        try:
            if k > 1:
                draws = None
                if any(j.request.sampling.temperature for j in jobs):
                    draws = [(j.request.sampling.temperature, j.request.sampling.top_k, j.request.sampling.top_p,
                              j.seed, j.completion) for j in jobs]
                scored = any(j.request.sampling.logprobs is not None for j in jobs)  # k = 0 here (_run_ahead)
                tokens, scores = self.served.decode_run(name, [j.last for j in jobs], group.batch, k, draws,
                                                        scored)  # rows x k each
            else:
                logits = self.served.decode(name, [j.last for j in jobs], group.batch)  # (rows, V)
        except Exception as e:
            log.exception("decode step failed for model %s", name)
            self._fail_group(name, f"{type(e).__name__}: {e}")
            return
        took = (time.perf_counter() - started) / k
        group.step_seconds = took if group.step_seconds is None else 0.8 * group.step_seconds + 0.2 * took
        greedy = greedy_tokens(logits) if k == 1 else None
        ended = failed = False
        for i, job in enumerate(jobs):
            if job.done:
                continue
            try:
                if k == 1:
                    self._advance(job, logits, i, greedy[i])
                else:
                    self._advance_run(job, tokens[i], scores[i] if scores is not None else None)
            except Exception as e:
                log.exception("request %s failed", job.request.request_id)
                self._finish(job, "error", error=f"{type(e).__name__}: {e}")
                failed = True
            ended = ended or job.done
        if ended:
            self._settle(name, compact=failed)  # a failed row (NaN logits, say) is not kept running

    def _run_ahead(self, name: str, group: Group) -> int:
        """Decode steps to take in one call for group `name`: 1, or up to RUN_AHEAD_MAX lasting about
        self.run_ahead seconds in all when no row wants top log-probs (the chosen token's own, which the REST front
        end asks of every request for the usage log, come from the C run), nobody waits for a free slot or a
        control call, and the model can (ServedModel.runs_ahead: the C step, and sampled rows drawn in C by the
        same rule as single steps, so a seed's tokens do not depend on the load). On a small model a step in C
        takes ~0.5 ms and the Python around it (this loop, the events, the event loop's thread taking the GIL)
        ~0.3 ms more; taken k at a time, that is paid once per k tokens. A job that ends inside the run (EOS, a stop
        string, max_tokens) keeps the tokens up to its end; the steps after it are discarded. Cancellations,
        deadlines and newcomers wait at most one run. Finished jobs' rows count for nothing here."""
        if (not self.run_ahead or group.step_seconds is None or self.controls
                or (self.pending and self.running < self.max_batch_size)):
            return 1
        live = [group.jobs[r] for r in group.live_rows()]
        k = min(RUN_AHEAD_MAX, int(self.run_ahead / max(group.step_seconds, 1e-6)),
                max(j.left for j in live))
        if k < 2 or any(j.request.sampling.logprobs for j in live):  # None or 0: the run gives them
            return 1
        return k if self.served.runs_ahead(name) else 1

    def _advance(self, job: Job, logits: torch.Tensor, row: int, greedy: int, prompt=None) -> None:
        """Choose the job's next token from row `row` of `logits` (rows, V), emit it, and finish the job if it ends
        here. `greedy` is that row's argmax; a greedy request without log-probs never touches `logits`."""
        sampling = job.request.sampling
        wants = sampling.logprobs is not None
        own = logits[row] if wants or sampling.temperature != 0 else None  # (V,)
        token = greedy if sampling.temperature == 0 else self.served.sampler.draw(own, sampling, job.seed,
                                                                                   job.completion)
        logprobs = []
        if wants:
            lp = torch.log_softmax(own.float(), dim=-1)
            logprobs = [token_logprob(lp, token, sampling.logprobs, self.served.text)]
        text, finish = self._accept(job, token)
        job.emit(Event(text=text, token_ids=[token], logprobs=logprobs, prompt_logprobs=prompt,
                       finish_reason=finish, prompt_tokens=len(job.request.prompt_ids),
                       completion_tokens=job.completion))

    def _advance_run(self, job: Job, tokens: list[int], scores: list[float] | None = None) -> None:
        """A run of tokens for `job` (_run_ahead), up to its end if it ends inside them: one event. `scores`: each
        token's log-prob, reported when the job asked for log-probs (k = 0: the chosen token's only)."""
        texts, taken, finish = [], [], None
        wants = job.request.sampling.logprobs is not None
        try:
            for token in tokens:
                if token < 0:
                    raise ValueError(NOTHING_TO_DRAW)
                text, finish = self._accept(job, token)
                texts.append(text)
                taken.append(token)
                if finish:
                    break
        finally:  # a token that failed ends the job (the caller's _finish); those before it still go out
            if taken:
                logprobs = [TokenLogprob(self.served.text(t), s, {}) for t, s in zip(taken, scores)] if wants else []
                job.emit(Event(text="".join(texts), token_ids=taken, logprobs=logprobs, finish_reason=finish,
                               prompt_tokens=len(job.request.prompt_ids), completion_tokens=job.completion))

    def _accept(self, job: Job, token: int) -> tuple[str, str | None]:
        """`token` as the job's next: (the text it releases, finish_reason if the job ends here, else None)."""
        job.completion += 1
        job.last = token
        eos = token in self.served.eos
        text, stopped = job.stops.feed(job.detok.add(token)) if not eos else ("", False)
        finish = "stop" if eos or stopped else "length" if job.completion >= job.request.sampling.max_tokens else None
        if finish and not stopped:
            text += job.stops.feed(job.detok.flush())[0] + job.stops.flush()
        if finish:
            self._retire(job)
        return text, finish

    def _finish(self, job: Job, reason: str, error: str | None = None) -> None:
        """End `job` outside the normal token flow (timeout, error, abort); a cancelled job's consumer is gone."""
        if job.done:
            return
        self._retire(job)
        if not job.cancelled:
            job.emit(Event(finish_reason=reason, error=error, prompt_tokens=len(job.request.prompt_ids),
                           completion_tokens=job.completion))

    def _retire(self, job: Job) -> None:
        job.done = True
        if job.admitted:
            self.running -= 1
            self.job_seconds = 0.8 * self.job_seconds + 0.2 * (time.monotonic() - job.started)

    def _settle(self, name: str, compact: bool = False) -> None:
        """After jobs of group `name` finished: drop the group if none runs; compact it if `compact` or if finished
        rows are more than half as many as live ones (each step pays for them; a compaction copies the live rows
        once, cheap when they are few: one live row then gets the one-row kernels back); else keep them for
        newcomers."""
        group = self.groups[name]
        live = len(group.live_rows())
        if compact or not live or 2 * (len(group.jobs) - live) > live:
            self._compact(name)

    def _compact(self, name: str) -> None:
        """Rebuild group `name` without its finished rows; running counts already dropped in _retire."""
        group = self.groups[name]
        keep = group.live_rows()
        if not keep:
            del self.groups[name]
            return
        group.jobs = [group.jobs[i] for i in keep]
        group.batch = merge([(group.batch, keep)], self._room(name, group))

    def _room(self, name: str, group: Group) -> int:
        """Columns for a rebuilt batch of `group` to reserve past its last: what its running jobs may still write
        (the most tokens any has left), as ServedModel.room allows. Reserved up front, a batch is not copied again
        until newcomers that need more have joined it."""
        return self.served.room(name, max((group.jobs[r].left for r in group.live_rows()), default=0))

    def _fail_group(self, name: str, error: str) -> None:
        for job in self.groups.pop(name).jobs:
            self._finish(job, "error", error=error)

    def _abort_all(self) -> None:
        """On stop: end everything still queued or running."""
        with self.lock:
            jobs = [*self.pending, *(j for g in self.groups.values() for j in g.jobs)]
            self.pending.clear()
        for job in jobs:
            self._finish(job, "error", error="the engine stopped before this generation finished")
        while self.controls:
            self.controls.popleft()[1].set_exception(NotReady("the engine stopped before the adapter change ran"))
        self.groups.clear()


def _nothing() -> None:
    """The flush of a scheduler whose jobs' emit delivers at once."""
