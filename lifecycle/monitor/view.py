"""How a tick looks: a rich table for the console (the report, the daemon's live view) and markdown for the run."""
from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from lifecycle.monitor.rules import Alerts
from lifecycle.monitor.traffic import NO_TRAFFIC

STYLE = {"firing": "bold red", "pending": "yellow", "ok": "green", "no data": "dim"}


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if isinstance(value, (int, float)) and abs(value) >= 1000 else f"{value:.4g}"


def headline(tick: dict, window_s: float) -> str:
    """One line: when, what was read, traffic or not, failures."""
    metrics, errors = tick["metrics"], tick["errors"]
    parts = [f"tick {tick['tick']}", "; ".join(f"{k}: {v}" for k, v in tick["sources"].items())]
    if metrics.get("serve/requests") == 0:
        parts.append(f"{NO_TRAFFIC} (last {window_s:g} s)")
    parts += [f"FAILED {k}: {v}" for k, v in errors.items()]
    return " | ".join(parts)


def rule_rows(alerts: Alerts, metrics: dict) -> list[tuple[str, str, str, str]]:
    """(rule, condition, value, state) per alert rule."""
    return [(r.name, r.describe(), fmt(metrics.get(r.metric)), alerts.state(r, metrics)) for r in alerts.rules]


def console(tick: dict, alerts: Alerts, window_s: float) -> Group:
    """The metrics table and the alert rules table of one tick."""
    metrics = Table()
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for key, value in tick["metrics"].items():
        metrics.add_row(key, fmt(value))
    for key, why in tick["absent"].items():
        metrics.add_row(key, f"[dim]absent: {why}[/dim]")
    rules = Table(title="alert rules", title_justify="left")
    for column in ("rule", "condition", "value", "state"):
        rules.add_column(column)
    for name, condition, value, state in rule_rows(alerts, tick["metrics"]):
        rules.add_row(name, condition, value, f"[{STYLE[state]}]{state}[/]")
    return Group(Text(headline(tick, window_s)), metrics, rules)


def markdown(tick: dict, alerts: Alerts, window_s: float, events: list[dict]) -> str:
    """report.md: headline, metrics, absent metrics with the reason, rule states, alert events."""
    lines = [f"# lifecycle monitor\n\n{headline(tick, window_s)}\n", "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in tick["metrics"].items()]
    lines += [f"| {k} | absent: {why} |" for k, why in tick["absent"].items()]
    lines += ["\n## Alert rules\n", "| rule | condition | value | state |", "|---|---|---:|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rule_rows(alerts, tick["metrics"])]
    if events:
        lines += ["\n## Alert events\n", "| time | status | rule | value | severity | action |",
                  "|---|---|---|---:|---|---|"]
        lines += [f"| {e['ts']:.0f} | {e['status']} | {e['rule']} | {fmt(e['value'])} | {e['severity']} | "
                  f"{e['action']} |" for e in events]
    return "\n".join(lines) + "\n"
