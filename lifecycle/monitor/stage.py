"""`lifecycle monitor`: the service's metrics over a window (the server's /metrics or Prometheus, and the request
log), drift when enabled, alert rules evaluated on each tick. mode=report: one tick, printed and written;
mode=daemon: a live view every interval_s until SIGINT/SIGTERM or max_ticks; mode=export: Prometheus alerting rules
and a Grafana dashboard from the same config (no server needed)."""
from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.live import Live

from lifecycle import artifacts, tracking
from lifecycle.config import resolved, validate
from lifecycle.monitor import export, hooks, rules as rules_mod, view
from lifecycle.monitor.notify import Notifier
from lifecycle.monitor.service import Collector

STAGE = "monitor"
log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    validate(cfg, STAGE)
    started, config = time.time(), resolved(cfg)
    rules = rules_mod.load(OmegaConf.to_container(cfg.alerts, resolve=True))
    if cfg.mode == "export":
        return _export(cfg, rules, started, config)
    if cfg.mode == "rollback":
        return _rollback(cfg, started, config)
    drift = hooks.drift_module(cfg)
    collector, alerts = Collector(cfg), rules_mod.Alerts(rules)
    first = _measure(cfg, collector, drift, 1, strict=cfg.mode == "report")  # one-shot: a failure is an error
    run_dir = artifacts.start_run(cfg.paths.run_dir, config)
    logger = tracking.make_logger(cfg.logger, run_dir, STAGE, cfg.name, config)
    notifier = Notifier(cfg.webhook.url, cfg.webhook.timeout_s, logger, str(run_dir))
    ticks = [_evaluate(cfg, first, alerts, notifier, logger, run_dir)]
    if cfg.mode == "daemon":
        ticks += _daemon(cfg, collector, drift, alerts, notifier, logger, run_dir, ticks[0])
    last = next((t for t in reversed(ticks) if not t["errors"]), ticks[-1])
    if cfg.mode == "report":
        Console().print(view.console(last, alerts, cfg.window_s))
    artifacts.write_json(run_dir / "report.json", {**last, "events": notifier.history})
    artifacts.atomic_write(run_dir / "report.md", view.markdown(last, alerts, cfg.window_s, notifier.history))
    metrics = {**last["metrics"], "monitor/ticks": len(ticks), "monitor/failed_ticks": sum(bool(t["errors"])
               for t in ticks), "monitor/alerts_fired": sum(e["status"] == "firing" for e in notifier.history)}
    notifier.finish()
    if drift is not None:
        hooks.plot_drift(drift, run_dir / "metrics.jsonl", run_dir / "drift.png")
    artifacts.finish_run(run_dir, STAGE, collector.sources(), metrics, config, started, tracking.run_id(logger))
    tracking.finish(logger)
    return metrics


def _rollback(cfg, started: float, config: dict) -> dict:
    """`lifecycle monitor mode=rollback`: production <- previous (and the server's alias with it)."""
    from lifecycle.monitor.registry import rollback

    result = rollback(cfg)
    run_dir = artifacts.start_run(cfg.paths.run_dir, config)
    artifacts.finish_run(run_dir, STAGE, {"registry": {"path": str(cfg.registry.path)}}, result, config, started)
    print(f"rolled back: production is {result['production']} again (was {result['previous']})")
    return result


def _measure(cfg, collector: Collector, drift, n: int, strict: bool) -> dict:
    """One tick's service metrics, plus drift.measure's when drift is enabled."""
    tick = collector.collect(n, strict)
    if drift is not None:
        hooks.measure_drift(drift, cfg, tick, strict)
    return tick


def _evaluate(cfg, tick: dict, alerts, notifier: Notifier, logger, run_dir: Path) -> dict:
    """Rules on the tick's metrics; each transition notified, a firing `action: retrain` rule starts retraining."""
    tick["events"] = alerts.evaluate(tick["metrics"], tick["ts"])
    for event in tick["events"]:
        notifier.send(event)
        if event["status"] == "firing" and event["action"] == "retrain":
            event["retrain"] = hooks.retrain(cfg, event)
    for event in tick["events"]:
        with open(run_dir / "alerts.jsonl", "a") as f:
            f.write(json.dumps(event, default=str) + "\n")
    line = {"tick": tick["tick"], "ts": tick["ts"], **tick["metrics"], **({"errors": tick["errors"]} if tick["errors"]
                                                                         else {})}
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    if tick["errors"]:
        log.warning("tick %d failed: %s", tick["tick"], "; ".join(f"{k}: {v}" for k, v in tick["errors"].items()))
    if logger is not None:
        logger.log_metrics(tick["metrics"], step=tick["tick"])
    return tick


def _daemon(cfg, collector, drift, alerts, notifier, logger, run_dir: Path, first: dict) -> list[dict]:
    """Ticks every interval_s after the first until SIGINT/SIGTERM or max_ticks, with a live console view."""
    ticks, stop, due = [], threading.Event(), time.monotonic()
    with _stop_on_signals(stop), Live(view.console(first, alerts, cfg.window_s), auto_refresh=False) as live:
        while not stop.is_set() and (cfg.max_ticks is None or 1 + len(ticks) < cfg.max_ticks):
            due += cfg.interval_s
            if stop.wait(max(0.0, due - time.monotonic())):
                break
            tick = _measure(cfg, collector, drift, 2 + len(ticks), strict=False)
            ticks.append(_evaluate(cfg, tick, alerts, notifier, logger, run_dir))
            live.update(view.console(tick, alerts, cfg.window_s), refresh=True)
    return ticks


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event):
    """SIGINT/SIGTERM end the daemon after the current tick (only the main thread may install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _export(cfg, rules, started: float, config: dict) -> dict:
    """alerts.yml and lifecycle.json in the run dir (and under export_dir, when set)."""
    files = {"prometheus/alerts.yml": export.alert_rules(rules, cfg.prometheus.selector, cfg.window_s, cfg.interval_s),
             "grafana/lifecycle.json": export.dashboard(rules, cfg.prometheus.selector, cfg.interval_s)}
    run_dir = artifacts.start_run(cfg.paths.run_dir, config)
    for root in [run_dir] + ([Path(cfg.export_dir)] if cfg.export_dir else []):
        for name, text in files.items():
            artifacts.atomic_write(root / name, text)
            print(f"wrote {root / name}")
    metrics = {"monitor/rules": len(rules), "monitor/prometheus_rules": len(export.on_server(rules))}
    artifacts.finish_run(run_dir, STAGE, {}, metrics, config, started)
    return metrics
