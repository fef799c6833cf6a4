"""`lifecycle usage`: the per-key statement of a usage database filled through the UsageMeter."""
from __future__ import annotations

import csv
import io
import json
import time

import pytest

from lifecycle.errors import ConfigError, DataError
from lifecycle.serve.usage import UsageMeter, UsageRecord
from lifecycle.usage.stage import run
from lifecycle.usage.statement import period

from conftest import cli, make_cfg

DAY = 86400.0


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    """alice: 3 fake + 1 ada requests this week (one 429); bob: 2 this week (one 500) and 1 forty days ago."""
    url = f"sqlite:///{tmp_path_factory.mktemp('serve') / 'usage.db'}"
    now, meter = time.time(), UsageMeter(url)
    rows = [("alice", "fake", 200, 10, 20, 100.0, 1), ("alice", "fake", 200, 5, 7, 50.0, 2),
            ("alice", "fake", 429, 0, 0, 1.0, 3), ("alice", "ada", 200, 4, 4, 30.0, 1),
            ("bob", "fake", 200, 8, 16, 80.0, 5), ("bob", "fake", 500, 3, 2, 40.0, 6),
            ("bob", "fake", 200, 1000, 1000, 5.0, 40)]
    for key, model, status, p, c, ms, days_ago in rows:
        meter.record(UsageRecord(key_id=key, model=model, frontend="grpc", route="Generate", status=status,
                                 prompt_tokens=p, completion_tokens=c, latency_ms=ms, ts=now - days_ago * DAY))
    meter.close()
    return url


def usage(tmp_path, *overrides: str):
    cfg = make_cfg("usage", tmp_path / "outputs" / "usage" / "run", ["logger=none", *overrides])
    return run(cfg), tmp_path / "outputs" / "usage" / "run"


def test_statement_per_key_and_model_for_the_last_30_days(db, tmp_path, capsys):
    metrics, run_dir = usage(tmp_path, f"db={db}")
    assert metrics == {"usage/keys": 2, "usage/requests": 6, "usage/prompt_tokens": 30, "usage/completion_tokens": 49,
                       "usage/errors": 2, "usage/mean_latency_ms": pytest.approx((151 + 30 + 120) / 6, abs=1e-3)}
    statement = json.loads((run_dir / "statement.json").read_text())
    got = {(r["key_id"], r["model"]): (r["requests"], r["prompt_tokens"], r["errors"]) for r in statement["rows"]}
    assert got == {("alice", "ada"): (1, 4, 0), ("alice", "fake"): (3, 15, 1), ("bob", "fake"): (2, 11, 1)}
    lines = list(csv.DictReader(io.StringIO((run_dir / "statement.csv").read_text())))
    assert [(r["key_id"], r["model"], r["requests"]) for r in lines] == [("alice", "ada", "1"), ("alice", "fake", "3"),
                                                                          ("bob", "fake", "2")]
    assert json.loads((run_dir / "manifest.json").read_text())["metrics"] == metrics
    table = capsys.readouterr().out
    assert "alice" in table and "bob" in table and "2 keys" in table and "50.3" in table  # alice/fake mean latency


def test_key_filter_period_and_formats(db, tmp_path, capsys):
    metrics, _ = usage(tmp_path, f"db={db}", "key=bob", "since=60d", "format=csv")
    assert (metrics["usage/requests"], metrics["usage/prompt_tokens"], metrics["usage/errors"]) == (3, 1011, 1)
    assert capsys.readouterr().out.splitlines()[1].startswith("bob,fake,3,1011,1018,")
    day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 45 * DAY))
    metrics, _ = usage(tmp_path, f"db={db}", f"since={day}", "until=20d", "format=json")
    assert metrics["usage/requests"] == 1 and json.loads(capsys.readouterr().out)["rows"][0]["key_id"] == "bob"
    metrics, _ = usage(tmp_path, f"db={db}", "key=nobody")
    assert metrics["usage/requests"] == 0


def test_periods():
    now = 1_000_000.0
    assert period("7d", None, now) == (now - 7 * DAY, now)
    assert period("12h", "30m", now) == (now - 12 * 3600, now - 1800)
    start, end = period("2026-11-01", "2026-11-01T12:00+01:00", now)  # dates are UTC unless they say otherwise
    assert (start, end - start) == (1793491200.0, 11 * 3600)
    for bad in ("yesterday", "7x", "-3d"):
        with pytest.raises(ConfigError, match="since="):
            period(bad, None, now)
    with pytest.raises(ConfigError, match="must be after"):
        period("1d", "2d", now)


def test_a_missing_database_is_a_clear_error_and_is_not_created(tmp_path):
    missing = tmp_path / "serve" / "usage.db"
    with pytest.raises(DataError, match="no usage recorded yet.*lifecycle serve"):
        usage(tmp_path, f"db=sqlite:///{missing}")
    assert not missing.exists() and not (tmp_path / "outputs" / "usage" / "run").exists()
    result = cli("lifecycle.usage", f"paths.output_root={tmp_path / 'outputs'}", "logger=none", timeout=120)
    assert result.returncode == 2 and "no usage recorded yet" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
