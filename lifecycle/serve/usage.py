"""Usage metering and the request log: one row per request (key, model, tokens, latency, status, prompt and output
statistics), in SQLite (WAL) by default or any SQLAlchemy database URL. Writes happen on a background thread so a
slow disk never stalls a response."""
from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field

from sqlalchemy import (
    JSON, Boolean, Column, Float, Integer, MetaData, String, Table, create_engine, event, func, inspect, select,
)
from sqlalchemy.engine import make_url

from lifecycle.errors import DataError

log = logging.getLogger(__name__)

metadata = MetaData()
requests_table = Table(
    "requests", metadata,
    Column("id", Integer, primary_key=True),
    Column("ts", Float, nullable=False, index=True),       # unix time the request arrived
    Column("key_id", String(64), nullable=False, index=True),
    Column("model", String(256), nullable=False),
    Column("frontend", String(8), nullable=False),         # rest | grpc
    Column("route", String(64), nullable=False),
    Column("status", Integer, nullable=False),             # HTTP status (gRPC codes mapped to their HTTP twin)
    Column("finish_reason", String(16)),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float),
    Column("mean_logprob", Float),                          # the generated tokens' mean log-prob, when computed
    Column("stats", JSON),                                  # prompt/output statistics for drift monitoring
    Column("text", JSON),                                   # prompt and output text, only where the config allows
    Column("request_id", String(64), index=True),           # the id the client got (cmpl-...), for feedback
)
# Ratings clients send about a completion (POST /v1/feedback); read by the monitor and the retrain loop.
feedback_table = Table(
    "feedback", metadata,
    Column("id", Integer, primary_key=True),
    Column("ts", Float, nullable=False, index=True),
    Column("request_id", String(64), nullable=False, index=True),
    Column("key_id", String(64), nullable=False),
    Column("rating", Integer, nullable=False),              # -1/+1 (scale "thumbs") or 1-5 (scale "stars")
    Column("scale", String(8), nullable=False),
    Column("negative", Boolean, nullable=False),            # thumbs down, or 1-2 stars
    Column("comment", String(2000)),
)


@dataclass
class UsageRecord:
    key_id: str
    model: str
    frontend: str
    route: str
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    finish_reason: str | None = None
    mean_logprob: float | None = None
    stats: dict | None = None
    text: dict | None = None
    ts: float = field(default_factory=time.time)
    request_id: str | None = None


def mean_logprob(entries) -> float | None:
    """The mean log-prob of generated tokens (TokenLogprob entries), what the monitor reads as the model's
    confidence; None when none has one."""
    lps = [e.logprob for e in entries if e.logprob is not None]
    return sum(lps) / len(lps) if lps else None


def request_stats(prompt: str, output: str, prompt_ids: list[int], output_ids: list[int]) -> dict:
    """What the drift monitor compares with the corpus profile, without keeping the text itself."""
    return {"prompt_chars": len(prompt), "output_chars": len(output), "prompt_token_ids": prompt_ids[:512],
            "output_token_ids": output_ids[:512], "empty_output": not output.strip()}


class UsageMeter:
    """Queue rows from any thread or coroutine; a writer thread commits them in batches."""

    def __init__(self, url: str, log_text: bool = False):
        self.url, self.log_text = url, log_text
        self.engine = create_engine(url)
        if self.engine.url.get_backend_name() == "sqlite" and self.engine.url.database not in (None, "", ":memory:"):
            Path(self.engine.url.database).parent.mkdir(parents=True, exist_ok=True)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        _add_missing_columns(self.engine)
        self._queue: queue.Queue[UsageRecord | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="usage-writer", daemon=True)
        self._writer.start()

    def record(self, row: UsageRecord) -> None:
        if not self.log_text:
            row.text = None
        self._queue.put(row)

    def flush(self, timeout: float = 10.0) -> None:
        """Block until every queued row is committed."""
        done = threading.Event()
        self._queue.put(done)  # type: ignore[arg-type]
        done.wait(timeout)

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._writer.join(timeout=10)
        self.engine.dispose()

    def _write_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty() and len(batch) < 256:
                batch.append(self._queue.get_nowait())
            rows = [asdict(r) for r in batch if isinstance(r, UsageRecord)]
            if rows:
                try:
                    with self.engine.begin() as conn:
                        conn.execute(requests_table.insert(), rows)
                except Exception:  # metering must never take the server down; the log says what was lost
                    log.exception("usage: %d rows could not be written to %s", len(rows), self.url)
            for r in batch:
                if isinstance(r, threading.Event):
                    r.set()
            if any(r is None for r in batch):
                return

    def record_feedback(self, request_id: str, key_id: str, rating: int, scale: str, negative: bool,
                        comment: str | None) -> int:
        """Store a rating of one of this key's completions; UnknownRequest if the key never got that id."""
        self.flush()  # the usage row of a request answered a moment ago may still be queued
        t = requests_table
        with self.engine.begin() as conn:
            known = conn.execute(select(t.c.id).where(t.c.request_id == request_id, t.c.key_id == key_id)
                                 .limit(1)).first()
            if known is None:
                raise UnknownRequest(request_id)
            row = dict(ts=time.time(), request_id=request_id, key_id=key_id, rating=rating, scale=scale,
                       negative=negative, comment=comment)
            return conn.execute(feedback_table.insert().values(**row)).inserted_primary_key[0]

    def statement(self, since: float, until: float, key_id: str | None = None) -> list[dict]:
        """Per key and model: requests, prompt/completion tokens, mean latency and errors in [since, until)."""
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(_statement_query(since, until, key_id))]


def read_statement(url: str, since: float, until: float, key_id: str | None = None) -> list[dict]:
    """UsageMeter.statement of the database at `url`, read-only: no writer thread, and a database that does not
    exist yet (no file, no table) raises NoUsage instead of being created empty."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not (parsed.database and Path(parsed.database).is_file()):
        raise NoUsage(url)
    engine = create_engine(url)
    try:
        if not inspect(engine).has_table(requests_table.name):
            raise NoUsage(url)
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(_statement_query(since, until, key_id))]
    finally:
        engine.dispose()


class NoUsage(DataError):
    """The usage database is not there yet: nothing has been served with metering on."""

    def __init__(self, url: str):
        super().__init__(f"no usage recorded yet: {url} does not exist; start `lifecycle serve` (it meters every "
                         "request there), or point db= at the server's usage database")


class UnknownRequest(DataError):
    """Feedback names a completion id this key was never given (or whose usage row was never written)."""

    def __init__(self, request_id: str):
        super().__init__(f"no completion {request_id!r} was served to this key")


def _add_missing_columns(engine) -> None:
    """Columns added to `requests` after a database was created (additive only): a usage.db of an older
    version keeps working and gains them."""
    have = {c["name"] for c in inspect(engine).get_columns(requests_table.name)}
    with engine.begin() as conn:
        for column in requests_table.columns:
            if column.name not in have:
                conn.exec_driver_sql(f"ALTER TABLE {requests_table.name} ADD COLUMN {column.name} "
                                     f"{column.type.compile(engine.dialect)}")


def _statement_query(since: float, until: float, key_id: str | None):
    t = requests_table
    query = (select(t.c.key_id, t.c.model, func.count().label("requests"),
                    func.sum(t.c.prompt_tokens).label("prompt_tokens"),
                    func.sum(t.c.completion_tokens).label("completion_tokens"),
                    func.avg(t.c.latency_ms).label("mean_latency_ms"),
                    func.sum((t.c.status >= 400).cast(Integer)).label("errors"))
             .where(t.c.ts >= since, t.c.ts < until).group_by(t.c.key_id, t.c.model)
             .order_by(t.c.key_id, t.c.model))
    return query if key_id is None else query.where(t.c.key_id == key_id)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (lifecycle usage, monitor) never block the server
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
