"""The monitor's hooks into the drift and retraining modules (lifecycle.monitor.drift, .retrain), imported only
when used: drift when `drift.enabled`, retraining when a rule with `action: retrain` fires."""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

from lifecycle.errors import ConfigError, DataError, LifecycleError

log = logging.getLogger(__name__)


def drift_module(cfg):
    """lifecycle.monitor.drift when drift.enabled (after checking its corpus profile and request log), else None."""
    if not cfg.drift.enabled:
        return None
    if not Path(cfg.drift.profile).is_file():
        raise DataError(f"drift.profile={cfg.drift.profile}: no corpus profile there; run `lifecycle data` (it "
                        "writes profile.json) or set drift.profile=<data run>/profile.json, or drift.enabled=false")
    if not cfg.db:
        raise ConfigError("drift.enabled=true reads the request log: set db=<the server's usage database URL>")
    return _optional("drift", "drift.enabled=false")


def measure_drift(drift, cfg, tick: dict, strict: bool) -> None:
    """Add drift.measure's scores over the tick's window to it; a window without traffic is noted, not an error."""
    try:
        tick["metrics"] |= drift.measure(cfg.drift, cfg.db, tick["ts"] - cfg.window_s, tick["ts"])
        tick["sources"]["drift"] = str(cfg.drift.profile)
    except Exception as e:  # a daemon tick records any failure and goes on; a one-shot report raises it
        if type(e).__name__ == "NoTraffic":
            tick["absent"]["drift/*"] = str(e)
        elif strict:
            raise
        else:
            tick["errors"]["drift"] = str(e) if isinstance(e, LifecycleError) else f"{type(e).__name__}: {e}"


def retrain(cfg, event: dict) -> dict:
    """retrain.run(cfg, alert); a missing module or a failed retrain is logged and recorded, never a crash."""
    try:
        result = _optional("retrain", f"alerts.{event['rule']}.action=none").run(cfg, event)
        log.info("retrain after alert %s: %s", event["rule"], result)
        return result
    except Exception as e:  # the monitor keeps watching whatever the retrain loop does
        log.exception("retrain after alert %s failed", event["rule"])
        return {"error": f"{type(e).__name__}: {e}"}


def plot_drift(drift, history: Path, png: Path) -> None:
    """drift.png from the run's metrics.jsonl, when drift ran and recorded scores."""
    try:
        drift.plot(history, png)
    except DataError as e:
        log.info("no drift plot: %s", e)


def _optional(name: str, instead: str):
    try:
        return importlib.import_module(f"lifecycle.monitor.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"lifecycle.monitor.{name}":
            raise
        raise ConfigError(f"lifecycle.monitor.{name} is not in this version of lifecycle yet; set {instead}") from None
