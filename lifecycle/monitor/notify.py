"""Where alert transitions go: the log, a webhook (POST JSON; a slow or dead endpoint is logged, never raised) and
W&B through lifecycle.tracking (an alert when online; an `alert/<rule>` metric and an `alerts` table either way)."""
from __future__ import annotations

import logging

import httpx

from lifecycle import tracking

log = logging.getLogger(__name__)
LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}
COLUMNS = ["ts", "status", "rule", "metric", "value", "condition", "severity", "action"]


class Notifier:
    """Sends each alert event everywhere configured; `history` keeps them for the run's alerts table."""

    def __init__(self, webhook_url: str | None, timeout_s: float, logger=None, run_dir: str = ""):
        self.webhook_url, self.timeout_s, self.logger, self.run_dir = webhook_url, timeout_s, logger, run_dir
        self.history: list[dict] = []

    def send(self, event: dict) -> None:
        event = {**event, "run_dir": self.run_dir}
        self.history.append(event)
        level = LEVELS[event["severity"]] if event["status"] == "firing" else logging.INFO
        log.log(level, "alert %s: %s (%s; value %s)", event["status"], event["rule"], event["condition"],
                _fmt(event["value"]))
        if self.webhook_url:
            self._post(event)
        if self.logger is not None:
            self.logger.log_metrics({f"alert/{event['rule']}": float(event["status"] == "firing")})
            if event["status"] == "firing":
                tracking.alert(self.logger, f"{event['rule']} ({event['severity']})",
                               f"{event['condition']}: value {_fmt(event['value'])}", event["severity"])

    def _post(self, event: dict) -> bool:
        try:
            response = httpx.post(self.webhook_url, json=event, timeout=self.timeout_s)
        except httpx.HTTPError as e:
            log.warning("alert webhook %s failed: %s: %s (alert %s kept in the log and alerts.jsonl)",
                        self.webhook_url, type(e).__name__, e or "no answer", event["rule"])
            return False
        if response.status_code >= 300:
            log.warning("alert webhook %s answered %d for alert %s", self.webhook_url, response.status_code,
                        event["rule"])
            return False
        return True

    def finish(self) -> None:
        """The run's alert events as one W&B table (when the logger has tables)."""
        if self.logger is not None and self.history and hasattr(self.logger, "log_table"):
            self.logger.log_table(key="alerts", columns=COLUMNS, data=[[e[c] for c in COLUMNS] for e in self.history])


def _fmt(value) -> str:
    return "absent" if value is None else f"{value:.4g}"
