"""Alert rules from config (`alerts.<name>: {metric, op, threshold, window, severity, action}`) and their state
from tick to tick: a rule fires once its condition has held for `window` consecutive ticks (an integer) or for a
duration (`45s`, `2m`, `1h`, held on every tick since the first breach), and resolves on the first tick it does not
hold. A metric absent from a tick (no traffic, no data) does not hold."""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from lifecycle.errors import ConfigError

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
SEVERITIES = ("info", "warning", "critical")
ACTIONS = ("none", "retrain")
FIELDS = ("metric", "op", "threshold", "window", "severity", "action")
DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h)$")


@dataclass(frozen=True)
class Rule:
    name: str
    metric: str
    op: str
    threshold: float
    ticks: int | None = 1          # consecutive ticks, or
    seconds: float | None = None   # a duration the condition holds
    severity: str = "warning"
    action: str = "none"

    def holds(self, metrics: dict) -> bool:
        value = metrics.get(self.metric)
        return value is not None and OPS[self.op](value, self.threshold)

    def describe(self) -> str:
        window = f"{self.ticks} tick(s)" if self.ticks is not None else f"{self.seconds:g} s"
        return f"{self.metric} {self.op} {self.threshold:g} for {window}"


def parse_window(name: str, window) -> tuple[int | None, float | None]:
    """(ticks, None) for an integer, (None, seconds) for a duration such as 45s, 2m or 1h."""
    if isinstance(window, int) and not isinstance(window, bool):
        if window < 1:
            raise ConfigError(f"alerts.{name}.window: {window} ticks; must be >= 1 (1: the first tick that holds)")
        return window, None
    match = DURATION.match(str(window).strip())
    if not match:
        raise ConfigError(f"alerts.{name}.window: {window!r}; give consecutive ticks (3) or a duration (45s, 2m, 1h)")
    return None, float(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]


def load(alerts: dict) -> list[Rule]:
    """Rules from the `alerts` config node (plain data), each checked under its own name."""
    return [_rule(name, r) for name, r in (alerts or {}).items()]


def _rule(name: str, r) -> Rule:
    missing = [k for k in FIELDS if not isinstance(r, dict) or r.get(k) is None]
    if missing:
        raise ConfigError(f"alerts.{name}.{missing[0]} is required: a rule is {{{', '.join(FIELDS)}}}")
    for key, allowed in (("op", OPS), ("severity", SEVERITIES), ("action", ACTIONS)):
        if str(r[key]) not in allowed:
            raise ConfigError(f"alerts.{name}.{key}: {r[key]!r}; must be one of {', '.join(allowed)}")
    unknown = sorted(set(r) - set(FIELDS))
    if unknown:
        raise ConfigError(f"alerts.{name}.{unknown[0]}: unknown key; a rule is {{{', '.join(FIELDS)}}}")
    try:
        threshold = float(r["threshold"])
    except (TypeError, ValueError):
        raise ConfigError(f"alerts.{name}.threshold: {r['threshold']!r} is not a number") from None
    ticks, seconds = parse_window(name, r["window"])
    return Rule(name, str(r["metric"]), r["op"], threshold, ticks, seconds, r["severity"], r["action"])


class Alerts:
    """Each rule's state across ticks; `evaluate` returns the transitions (firing, resolved) of one tick."""

    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self.streak = {r.name: 0 for r in rules}
        self.since: dict[str, float | None] = {r.name: None for r in rules}
        self.firing = {r.name: False for r in rules}

    def evaluate(self, metrics: dict, ts: float) -> list[dict]:
        events = []
        for rule in self.rules:
            if rule.holds(metrics):
                self.streak[rule.name] += 1
                if self.since[rule.name] is None:
                    self.since[rule.name] = ts
                due = (self.streak[rule.name] >= rule.ticks if rule.ticks is not None
                       else ts - self.since[rule.name] >= rule.seconds)
                if due and not self.firing[rule.name]:
                    self.firing[rule.name] = True
                    events.append(self._event(rule, "firing", metrics, ts))
            else:
                self.streak[rule.name], self.since[rule.name] = 0, None
                if self.firing[rule.name]:
                    self.firing[rule.name] = False
                    events.append(self._event(rule, "resolved", metrics, ts))
        return events

    def state(self, rule: Rule, metrics: dict) -> str:
        """ok | pending | firing | no data, for the console view."""
        if self.firing[rule.name]:
            return "firing"
        if rule.metric not in metrics:
            return "no data"
        return "pending" if self.streak[rule.name] else "ok"

    def _event(self, rule: Rule, status: str, metrics: dict, ts: float) -> dict:
        return {"status": status, "rule": rule.name, "metric": rule.metric, "value": metrics.get(rule.metric),
                "op": rule.op, "threshold": rule.threshold, "condition": rule.describe(), "severity": rule.severity,
                "action": rule.action, "ts": ts, "since": self.since[rule.name]}
