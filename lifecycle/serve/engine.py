"""The real engine behind the REST and gRPC front ends: a local transformers model with continuous batching.

`LocalEngine` implements lifecycle.serve.protocol.Engine. The model, tokenizer and adapters live on one decode thread
(lifecycle.serve.scheduler); this class checks requests, queues them and bridges each job's events to asyncio.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections import deque
from functools import partial
from pathlib import Path
from typing import AsyncIterator

from lifecycle.errors import ConfigError
from lifecycle.serve.protocol import (
    ContextTooLong, EngineError, Event, GenerationRequest, InvalidPrompt, ModelNotFound, NoChatTemplate, NotReady,
    Overloaded,
)

log = logging.getLogger(__name__)


class LocalEngine:
    """Serves one base model from `model` (a save_pretrained or `lifecycle optimize` directory) and its adapters."""

    def __init__(self, model: str, name: str | None = None, adapters: dict[str, str] | None = None,
                 max_batch_size: int = 8, max_queue: int = 32, context_length: int | None = None,
                 device: str = "cpu", dtype: str = "float32", threads: int | None = None,
                 model_root: str | None = None, fast_decode: bool = True, compile: bool = False,
                 native: bool | str = "auto", run_ahead_ms: float = 4.0):
        self.model_dir = Path(model)
        self.name = name or self.model_dir.name
        self.adapter_dirs = dict(adapters or {})
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.device, self.dtype, self.threads = device, dtype, threads
        self.fast_decode = fast_decode  # the base model's decode steps by lifecycle.serve.fastpath where it applies
        self.compile = compile  # ... torch.compile'd at start (fastpath.FastDecoder; 48-73 s for an 11M Llama, 2 cores)
        if native not in (True, False, "auto"):
            raise ConfigError(f"deploy.engine.native must be true, false or auto, got {native!r}")
        self.native = native  # ... or run in C (lifecycle.serve.native): auto where it builds and applies
        if not run_ahead_ms >= 0:
            raise ConfigError(f"deploy.engine.run_ahead_ms must be >= 0 (0: one step per call), got {run_ahead_ms!r}")
        self.run_ahead = run_ahead_ms / 1000  # steps taken several per C call, about this long (Scheduler)
        self.model_root = Path(model_root).resolve() if model_root else None
        self.context_length = context_length or _configured_context(self.model_dir)
        self.load_error: BaseException | None = None  # why the last start() failed, for the log and /ready
        self._served = None
        self._scheduler = None
        self._ready = False
        self._outboxes: dict[asyncio.AbstractEventLoop, Outbox] = {}  # one per event loop that has asked
        self._detok_decode = None     # decode() for the Detokenizer, the Rust tokenizer's where that is the same

    @property
    def ready(self) -> bool:
        return self._ready

    def model_names(self) -> list[str]:
        return [self.name, *(self._served.adapters if self._served else ())]

    def stats(self) -> dict[str, int]:
        s = self._scheduler
        return {"running": s.running, "queued": len(s.pending)} if s else {"running": 0, "queued": 0}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens only where the tokenizer needs a BOS in front."""
        tok = self._tokenizer()
        ids = tok.encode(text, add_special_tokens=False)
        if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None and ids[:1] != [tok.bos_token_id]:
            ids = [tok.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        """tokenizer.decode(ids, skip_special_tokens=True), through the Rust tokenizer where that is the same."""
        self._tokenizer()  # NotReady before start and after stop
        return self._detok_decode(ids)

    def render_chat(self, messages: list[dict], model: str | None = None) -> list[int]:
        """The chat template (an adapter's own, saved by `lifecycle finetune`, else the base's) applied with the
        assistant's turn opened; NoChatTemplate when neither has one."""
        tok = self._tokenizer()
        template = _adapter_chat_template(self._served.adapters.get(model)) if self._served and model else None
        template = template or tok.chat_template
        if template is None:
            raise NoChatTemplate(f"model {model or self.name} has no chat template (neither it nor its base's "
                                 "tokenizer sets one): send a plain prompt to /v1/completions, or serve a "
                                 "`lifecycle finetune` output")
        out = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream the job's events; refusals raise from the first __anext__, closing the stream cancels the job."""
        job, scheduler = self._admit(request), self._scheduler  # stop() may drop self._scheduler meanwhile
        try:
            while True:
                event = await job.events.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if not job.done:
                job.cancelled = True
                scheduler.wake.set()

    def _admit(self, request: GenerationRequest):
        from lifecycle.serve.detok import Detokenizer, StopMatcher
        from lifecycle.serve.sampler import job_seed
        from lifecycle.serve.scheduler import Job

        if not self._ready:
            raise NotReady(f"model {self.name} is not loaded" + (f" (load failed: {self.load_error})"
                                                                 if self.load_error else ""))
        if request.model not in self.model_names():
            raise ModelNotFound(f"model {request.model!r} not found; served: {', '.join(self.model_names())}")
        self._check_prompt(request)
        s = self._scheduler
        if s.running + len(s.pending) >= self.max_batch_size + self.max_queue:
            wait = s.job_seconds * (1 + len(s.pending)) / self.max_batch_size
            raise Overloaded(f"{s.running} running and {len(s.pending)} queued requests: at the limit of "
                             f"{self.max_batch_size} + {self.max_queue}", retry_after=max(1.0, round(wait, 1)))
        events = asyncio.Queue()
        job = Job(request, partial(self._outbox().post, events),
                  Detokenizer(self._detok_decode, request.prompt_ids), StopMatcher(request.sampling.stop),
                  job_seed(request.sampling.seed))
        job.events = events
        s.submit(job)
        return job

    def _outbox(self) -> Outbox:
        """The running event loop's outbox (made on its first request; those of closed loops are dropped then)."""
        loop = asyncio.get_running_loop()
        box = self._outboxes.get(loop)
        if box is None:
            live = {old: b for old, b in self._outboxes.items() if not old.is_closed()}
            box = live[loop] = Outbox(loop)
            self._outboxes = live  # replaced, not mutated: the decode thread may be iterating the old one
        return box

    def _flush(self) -> None:
        """Scheduler.flush: on the decode thread, hand every loop its queued events (one wake-up each at most)."""
        for box in self._outboxes.values():
            box.flush()

    def _check_prompt(self, request: GenerationRequest) -> None:
        n, m, limit = len(request.prompt_ids), request.sampling.max_tokens, self.context_length
        if n == 0:
            raise InvalidPrompt("the prompt is empty: give at least one token")
        if n > limit:
            raise ContextTooLong(f"the prompt has {n} tokens, over the context length of {limit} tokens")
        if n + m > limit:
            raise ContextTooLong(f"the prompt ({n} tokens) + max_tokens ({m}) = {n + m} tokens exceeds the context "
                                 f"length of {limit} tokens: shorten the prompt or ask for at most {limit - n} tokens")
        vocab = self._served.vocab_size
        bad = [t for t in request.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidPrompt(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")

    async def load_adapter(self, name: str, path: str) -> None:
        """Load an adapter at runtime, between decode steps; its directory must lie inside model_root."""
        if not self._ready:
            raise NotReady(f"model {self.name} is not loaded")
        if name in self.model_names():
            raise EngineError(f"a model named {name!r} is already served; unload it first or pick another name")
        directory = self._inside_root(path)
        await asyncio.wrap_future(self._scheduler.call(lambda: self._served.add_adapter(name, directory)))

    async def unload_adapter(self, name: str) -> None:
        """Unload an adapter between decode steps; its running and queued jobs end with an error."""
        if not self._ready:
            raise NotReady(f"model {self.name} is not loaded")
        if name == self.name:
            raise EngineError(f"{name!r} is the base model, not an adapter; it cannot be unloaded")
        await asyncio.wrap_future(self._scheduler.call(lambda: self._unload(name)))

    def _unload(self, name: str) -> None:
        self._scheduler.drop_model(name, f"adapter {name} was unloaded")
        self._served.remove_adapter(name)

    def _inside_root(self, path: str) -> Path:
        """`path` resolved (symlinks followed) and checked to lie inside model_root; ModelNotFound otherwise."""
        if self.model_root is None:
            raise EngineError("adapters cannot be loaded at runtime: the engine has no model_root (set "
                              "engine.model_root to the directory adapters may be loaded from)")
        given = Path(path)
        resolved = (given if given.is_absolute() else self.model_root / given).resolve()
        if not resolved.is_relative_to(self.model_root):
            raise ModelNotFound(f"adapter path {path!r} is outside the model root {self.model_root}")
        if not resolved.is_dir():
            raise ModelNotFound(f"no adapter directory {path!r} under the model root")
        for file in resolved.iterdir():  # a link inside may still lead out
            if not file.resolve().is_relative_to(self.model_root):
                raise ModelNotFound(f"adapter {path!r}: {file.name} links outside the model root")
        return resolved

    async def start(self) -> None:
        """Load the model, tokenizer and adapters on the decode thread (so /health answers), then start decoding.

        Loading there, not in a pool thread, keeps the decode thread the process's only OpenMP master: a second
        thread that has run a parallel region keeps its own OpenMP team, libgomp then counts more threads than
        cores and stops spinning between regions, and every small op of a decode step pays a futex wake-up
        (measured on 2 cores: a (1, 256) x (256, 688) linear 10 us -> 92 us)."""
        from lifecycle.serve.detok import plain_decoder
        from lifecycle.serve.scheduler import Scheduler

        self.load_error = None
        scheduler = Scheduler(None, self.max_batch_size, flush=self._flush, run_ahead=self.run_ahead)
        scheduler.thread.start()
        try:
            served = await asyncio.wrap_future(scheduler.call(self._load))
        except Exception as e:
            await asyncio.to_thread(scheduler.stop)
            self.load_error = e
            log.error("loading %s failed: %s", self.model_dir, e)
            raise
        scheduler.served = served
        self._detok_decode = plain_decoder(served.tokenizer)
        self._served, self._scheduler = served, scheduler
        self._ready = True

    def _load(self):
        import torch

        from lifecycle.models.load import load_model
        from lifecycle.serve.served import ServedModel

        if self.threads:
            torch.set_num_threads(self.threads)
        model, tokenizer = load_model(self.model_dir, self.device)
        wanted = getattr(torch, self.dtype)
        if next(model.parameters()).dtype != wanted:
            model = model.to(wanted)
        served = ServedModel(model, tokenizer, self.name, self.fast_decode, self.compile, self.native)
        self.context_length = self.context_length or model.config.max_position_embeddings
        for adapter, directory in self.adapter_dirs.items():
            served.add_adapter(adapter, Path(directory))
        # Everything loaded so far (the model, transformers, torch: millions of objects) leaves the collector's
        # generations; otherwise each full collection walks them all on the decode thread (a ~10% of its samples
        # in a 6,000-step native decode profile). stop() gives them back.
        gc.collect()
        gc.freeze()
        return served

    async def stop(self) -> None:
        """End every job still queued or running, stop the decode thread and free the model."""
        self._ready = False
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.stop)
        self._scheduler, self._served, self._detok_decode = None, None, None
        gc.unfreeze()  # the dropped model's reference cycles become collectable again

    def _tokenizer(self):
        if self._served is None:
            raise NotReady(f"model {self.name} is not loaded")
        return self._served.tokenizer


class Outbox:
    """Events from the decode thread to the queues of one event loop's consumers.

    `post` (a job's emit) only appends; `flush`, run by the scheduler after each phase of a step, schedules one
    delivery callback on the loop unless one is already pending. So 8 rows' tokens are one wake-up of the loop, not
    8 call_soon_threadsafe (each a write to the loop's self-pipe and a GIL hand-off), and the consumers run while
    the next forward does. Order per queue is kept (one FIFO)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: deque[tuple[asyncio.Queue, Event]] = deque()
        self.scheduled = False        # a delivery is queued on the loop and has not yet started draining
        self.closed = False           # the loop has closed: nothing will read these queues again

    def post(self, queue: asyncio.Queue, event: Event) -> None:
        """Decode thread: queue `event` for `queue` (delivered at the next flush)."""
        if not self.closed:
            self.items.append((queue, event))

    def flush(self) -> None:
        """Decode thread: have the loop deliver what is queued. A delivery that has started draining clears
        `scheduled` first, so an event posted meanwhile is either drained by it or schedules the next."""
        if self.items and not self.scheduled:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop has closed (its consumers are gone)
                self.closed = True
                self.items.clear()

    def _deliver(self) -> None:
        """The loop's thread: every queued event into its queue, in order."""
        self.scheduled = False
        items = self.items
        while items:
            queue, event = items.popleft()
            queue.put_nowait(event)


def _configured_context(model_dir: Path) -> int:
    """max_position_embeddings (n_positions for GPT-2) from config.json, read without loading the model; 0 if absent."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 0
    return int(config.get("max_position_embeddings") or config.get("n_positions") or 0)


def _adapter_chat_template(directory: str | None) -> str | None:
    """The chat template saved beside an adapter (chat_template.jinja, or tokenizer_config.json's), if any."""
    if not directory:
        return None
    jinja, config = Path(directory) / "chat_template.jinja", Path(directory) / "tokenizer_config.json"
    if jinja.is_file():
        return jinja.read_text()
    if config.is_file():
        return json.loads(config.read_text()).get("chat_template")
    return None
