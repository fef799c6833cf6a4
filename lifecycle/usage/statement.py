"""The statement's period, totals and renderings (a rich table, CSV, JSON)."""
from __future__ import annotations

import csv
import io
import json
import re
import time
from datetime import datetime, timezone

from rich.console import Console
from rich.table import Table

from lifecycle.errors import ConfigError

SPAN = re.compile(r"^(\d+(?:\.\d+)?)([mhdw])$")
SPAN_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
COLUMNS = ("key_id", "model", "requests", "prompt_tokens", "completion_tokens", "mean_latency_ms", "errors")


def when(value: str, key: str, now: float) -> float:
    """A unix time from an ISO date/time (UTC unless it has an offset) or a span back from `now` (7d, 12h)."""
    span = SPAN.match(str(value).strip())
    if span:
        return now - float(span[1]) * SPAN_SECONDS[span[2]]
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"{key}={value}: not an ISO date/time (2026-11-01, 2026-11-01T12:00) or a span back "
                          "from now (30m, 12h, 7d, 2w)") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


def period(since: str, until: str | None, now: float | None = None) -> tuple[float, float]:
    """[since, until) as unix times; until None is now."""
    now = time.time() if now is None else now
    start, end = when(since, "since", now), now if until is None else when(until, "until", now)
    if end <= start:
        raise ConfigError(f"until ({until or 'now'}) must be after since ({since})")
    return start, end


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def totals(rows: list[dict]) -> dict:
    """Sums over every key and model; the mean latency weighted by requests."""
    n = sum(r["requests"] for r in rows)
    return {"keys": len({r["key_id"] for r in rows}), "requests": n,
            "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows),
            "completion_tokens": sum(r["completion_tokens"] or 0 for r in rows),
            "errors": sum(r["errors"] or 0 for r in rows),
            "mean_latency_ms": sum(r["mean_latency_ms"] * r["requests"] for r in rows) / n if n else 0.0}


def as_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: r[k] for k in COLUMNS} for r in rows)
    return out.getvalue()


def as_json(statement: dict) -> str:
    return json.dumps(statement, indent=2)


def print_table(statement: dict, console: Console | None = None) -> None:
    """One row per key and model, a subtotal per key with several models, then the total."""
    p, rows, total = statement["period"], statement["rows"], statement["totals"]
    table = Table(title=f"usage {p['since']} .. {p['until']}" + (f"  key {statement['key']}"
                                                                 if statement["key"] else ""))
    for name in ("key", "model", "requests", "prompt tokens", "completion tokens", "mean latency ms", "errors"):
        table.add_column(name, justify="left" if name in ("key", "model") else "right")
    for key in dict.fromkeys(r["key_id"] for r in rows):
        mine = [r for r in rows if r["key_id"] == key]
        for r in mine:
            table.add_row(key, r["model"], *_cells(r))
        if len(mine) > 1:
            table.add_row(key, "[i]all[/i]", *_cells(totals(mine)), style="bold")
    table.add_section()
    table.add_row(f"{total['keys']} keys", "", *_cells(total), style="bold")
    (console or Console()).print(table)


def _cells(r: dict) -> list[str]:
    return [f"{r['requests']:,}", f"{r['prompt_tokens'] or 0:,}", f"{r['completion_tokens'] or 0:,}",
            f"{r['mean_latency_ms'] or 0:,.1f}", f"{r['errors'] or 0:,}"]
