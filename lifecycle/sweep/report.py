"""The sweep summary: every trial's parameters and objective, the best trial and its run dir (rich, JSON, markdown)."""
from __future__ import annotations

from pathlib import Path

from lifecycle import artifacts


def write(study, spec, sweep_dir: Path) -> dict:
    """summary.json and summary.md under the sweep dir, from the study."""
    rows = [_row(t) for t in study.get_trials(deepcopy=False) if t.state.name != "RUNNING"]
    done = [r for r in rows if r["state"] == "COMPLETE"]
    pick = min if spec.direction == "minimize" else max
    best = pick(done, key=lambda r: r["value"]) if done else None
    summary = {"name": spec.name, "stage": spec.stage, "metric": spec.metric, "direction": spec.direction,
               "study": str(sweep_dir / "study.db"), "best": best, "trials": rows}
    artifacts.write_json(sweep_dir / "summary.json", summary)
    artifacts.atomic_write(sweep_dir / "summary.md", markdown(summary))
    return summary


def _row(t) -> dict:
    return {"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
            "run_dir": t.user_attrs.get("run_dir"), "metrics": t.user_attrs.get("metrics", {}),
            "error": t.user_attrs.get("error")}


def markdown(summary: dict) -> str:
    keys = sorted({k for r in summary["trials"] for k in r["params"]})
    head = ["trial", "state", *keys, summary["metric"]]
    lines = [f"# Sweep {summary['name']} ({summary['stage']}, {summary['direction']} {summary['metric']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["trials"]:
        cells = [r["number"], r["state"], *(_fmt(r["params"].get(k)) for k in keys), _fmt(r["value"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    best = summary["best"]
    lines += ["", f"Best: trial {best['number']}, {summary['metric']} = {_fmt(best['value'])}, {best['run_dir']}"
              if best else "Best: none finished"]
    return "\n".join(lines) + "\n"


def show(summary: dict, sweep_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = sorted({k for r in summary["trials"] for k in r["params"]})
    table = Table(title=f"sweep {summary['name']}: {summary['direction']} {summary['metric']}")
    for col in ["trial", "state", *keys, summary["metric"]]:
        table.add_column(col, justify="right")
    best = summary["best"]
    for r in summary["trials"]:
        style = "bold green" if best and r["number"] == best["number"] else None
        table.add_row(str(r["number"]), r["state"].lower(), *(_fmt(r["params"].get(k)) for k in keys),
                      _fmt(r["value"]), style=style)
    console = Console()
    console.print(table)
    if best:
        console.print(f"best: trial {best['number']} {summary['metric']}={_fmt(best['value'])} -> {best['run_dir']}")
    console.print(f"summary: {sweep_dir / 'summary.md'}, study: {summary['study']}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
