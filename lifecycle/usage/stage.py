"""`lifecycle usage`: the usage meter's statement per API key and model for a period, printed and written."""
from __future__ import annotations

import time

from omegaconf import DictConfig
from sqlalchemy.engine import make_url

from lifecycle import artifacts, tracking
from lifecycle.config import resolved, validate
from lifecycle.serve.usage import read_statement
from lifecycle.usage.statement import as_csv, as_json, iso, period, print_table, totals

STAGE = "usage"


def run(cfg: DictConfig) -> dict:
    validate(cfg, STAGE)
    db = make_url(cfg.db).render_as_string(hide_password=True)  # a server database's password stays out of outputs/
    started, config = time.time(), {**resolved(cfg), "db": db}
    since, until = period(cfg.since, cfg.until)
    rows = read_statement(cfg.db, since, until, key_id=cfg.key)  # a missing database: NoUsage, before any output
    rows = [{**r, "mean_latency_ms": round(r["mean_latency_ms"] or 0.0, 3)} for r in rows]
    statement = {"db": db, "period": {"since": iso(since), "until": iso(until)}, "key": cfg.key, "rows": rows,
                 "totals": totals(rows)}
    run_dir = artifacts.start_run(cfg.paths.run_dir, config)
    artifacts.write_json(run_dir / "statement.json", statement)
    artifacts.atomic_write(run_dir / "statement.csv", as_csv(rows))
    metrics = {f"usage/{k}": round(v, 3) if isinstance(v, float) else v for k, v in statement["totals"].items()}
    logger = tracking.make_logger(cfg.logger, run_dir, STAGE, cfg.name, config)
    if logger is not None:
        logger.log_metrics(metrics)
    artifacts.finish_run(run_dir, STAGE, {"db": db}, metrics, config, started, tracking.run_id(logger))
    tracking.finish(logger)
    if cfg.format == "table":
        print_table(statement)
    else:
        print(as_csv(rows) if cfg.format == "csv" else as_json(statement), end="" if cfg.format == "csv" else "\n")
    return metrics
