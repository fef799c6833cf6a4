"""The promotion gate: rules that compare the candidate's metrics with those of an incumbent evaluation run.

A rule is {metric, change, op, value}. `metric` names one eval/... metric or is a glob (eval/task/*/acc) that
expands to every metric both runs have. The measured change is candidate - incumbent (`absolute`) or
(candidate - incumbent) / |incumbent| (`relative`); the rule passes when `change <op> value`. The margin is how far
the change is inside the threshold (negative: by how much it missed). A named metric missing from either run, or a
glob matching nothing, fails its rule: a gate that silently compares nothing would pass anything.
"""
from __future__ import annotations

import fnmatch
import operator
from numbers import Real

from lifecycle import artifacts
from lifecycle.errors import ConfigError, LifecycleError

OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def incumbent_metrics(run_dir: str | None) -> dict | None:
    """The metrics in the incumbent evaluation's manifest (None: no gate)."""
    if run_dir is None:
        return None
    try:
        return artifacts.read_manifest(run_dir, "evaluate")["metrics"]
    except LifecycleError as e:
        raise ConfigError(f"gate.incumbent: {e}") from None


def check(candidate: dict, incumbent: dict, rules: list[dict]) -> dict:
    """{"verdict": "pass" | "fail", "rules": [one row per rule and matched metric]}."""
    rows = []
    for rule in rules:
        names = _expand(rule["metric"], candidate, incumbent)
        if not names:
            rows.append({**_describe(rule), "metric": rule["metric"], "passed": False,
                         "reason": "no metric matches in both runs"})
        rows += [_apply(rule, name, candidate.get(name), incumbent.get(name)) for name in names]
    return {"verdict": "pass" if all(r["passed"] for r in rows) else "fail", "rules": rows}


def failures(verdict: dict) -> str:
    """The failed rules in one line each, for the error message."""
    return "; ".join(f"{r['metric']}: {r.get('reason') or _measured(r)}" for r in verdict["rules"] if not r["passed"])


def _measured(row: dict) -> str:
    return (f"{row['change_kind']} change {row['change']:+.4g} is not {row['op']} {row['value']:g} "
            f"(candidate {row['candidate']:.4g}, incumbent {row['incumbent']:.4g}, margin {row['margin']:+.4g})")


def _expand(pattern: str, candidate: dict, incumbent: dict) -> list[str]:
    if not any(c in pattern for c in "*?["):
        return [pattern]
    both = [k for k in candidate if _number(candidate[k]) and _number(incumbent.get(k))]
    return sorted(k for k in both if fnmatch.fnmatchcase(k, pattern))


def _apply(rule: dict, name: str, cand, inc) -> dict:
    row = {**_describe(rule), "metric": name, "candidate": cand, "incumbent": inc}
    if not (_number(cand) and _number(inc)):
        side = "candidate" if not _number(cand) else "incumbent"
        return {**row, "passed": False, "reason": f"missing in the {side} run"}
    if row["change_kind"] == "relative" and inc == 0:
        return {**row, "passed": False, "reason": "incumbent is 0, a relative change is undefined; use absolute"}
    change = cand - inc if row["change_kind"] == "absolute" else (cand - inc) / abs(inc)
    value = row["value"]
    margin = value - change if row["op"] in ("<=", "<") else change - value
    return {**row, "change": change, "margin": margin, "passed": bool(OPS[row["op"]](change, value))}


def _describe(rule: dict) -> dict:
    kind = getattr(rule["change"], "value", rule["change"])  # an Enum from a structured config, or its name
    return {"rule": f"{rule['metric']} {kind} {rule['op']} {rule['value']:g}", "change_kind": kind,
            "op": rule["op"], "value": float(rule["value"])}


def _number(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)
