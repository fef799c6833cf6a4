"""Per-API-key bills: the serving usage meter's statement for a period times the configured prices per 1K tokens."""
from __future__ import annotations

import calendar
import time
from datetime import datetime, timezone
from pathlib import Path

from lifecycle.errors import ConfigError


def period(since: str | None, until: str | None, now: float | None = None) -> tuple[float, float]:
    """[since, until) as unix times from ISO dates; null since: the start of this month (UTC), null until: now."""
    now = time.time() if now is None else now
    if since is None:
        t = time.gmtime(now)
        start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    else:
        start = _timestamp(since, "billing.since")
    end = now if until is None else _timestamp(until, "billing.until")
    if end <= start:
        raise ConfigError(f"billing: until ({until}) must be after since ({since})")
    return float(start), float(end)


def _timestamp(value: str, key: str) -> float:
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"{key}={value}: not an ISO date or time, e.g. 2026-11-01 or 2026-11-01T12:00") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


def statement(db: str, since: float, until: float) -> list[dict]:
    """The usage meter's rows per key and model in [since, until); a missing SQLite file is an error, not a new DB."""
    if db.startswith("sqlite:///") and not Path(db.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"billing.db={db}: no such database file; give the serving usage meter's URL "
                          "(conf/serve.yaml), e.g. billing.db=sqlite:///outputs/serve/usage.db")
    from lifecycle.serve.usage import UsageMeter

    meter = UsageMeter(db)
    try:
        return meter.statement(since, until)
    finally:
        meter.close()


def bill(rows: list[dict], prompt_usd_per_1k: float, completion_usd_per_1k: float, models: dict) -> list[dict]:
    """Each statement row priced: prompt and completion tokens at their model's price (models.<name>) or the default."""
    out = []
    for r in rows:
        price = models.get(r["model"], {})
        p_rate = price.get("prompt_usd_per_1k", prompt_usd_per_1k)
        c_rate = price.get("completion_usd_per_1k", completion_usd_per_1k)
        prompt_usd, completion_usd = r["prompt_tokens"] * p_rate / 1000, r["completion_tokens"] * c_rate / 1000
        out.append({"key_id": r["key_id"], "model": r["model"], "requests": r["requests"], "errors": r["errors"],
                    "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                    "prompt_usd": prompt_usd, "completion_usd": completion_usd,
                    "total_usd": prompt_usd + completion_usd})
    return out


def totals(lines: list[dict]) -> dict[str, float]:
    """The amount due per API key."""
    due: dict[str, float] = {}
    for line in lines:
        due[line["key_id"]] = due.get(line["key_id"], 0.0) + line["total_usd"]
    return due
