"""The evaluation's human-readable side: summary.md and the console tables (the same three tables)."""
from __future__ import annotations

SPLITS = ("general", "domain")
SPLIT_COLUMNS = ("loss", "ppl", "bpb", "tokens")
TASK_COLUMNS = ("acc", "acc_norm", "items", "contamination")
GATE_COLUMNS = ("metric", "rule", "candidate", "incumbent", "change", "margin", "result")


def tables(metrics: dict, gate: dict | None) -> list[tuple[str, tuple[str, ...], list[list[str]]]]:
    """(title, header, rows) for held-out data, tasks and the gate; tables without rows are left out."""
    splits = [[s, *(_fmt(metrics.get(f"eval/{s}/{c}")) for c in SPLIT_COLUMNS)] for s in SPLITS
              if f"eval/{s}/loss" in metrics]
    names = sorted({k.split("/")[2] for k in metrics if k.startswith("eval/task/")})
    tasks = [[t, *(_fmt(metrics.get(f"eval/task/{t}/{c}")) for c in TASK_COLUMNS)] for t in names]
    out = [("held-out data", ("split", *SPLIT_COLUMNS), splits),
           ("tasks (contamination: share of items sharing an n-gram with the training corpus)",
            ("task", *TASK_COLUMNS), tasks)]
    if gate is not None:
        rows = [_gate_row(r) for r in gate["rules"]]
        out.append((f"gate vs {gate['incumbent']}: {gate['verdict'].upper()}", GATE_COLUMNS, rows))
    return [table for table in out if table[2]]


def _gate_row(r: dict) -> list[str]:
    measured = [_fmt(r.get(k)) for k in ("candidate", "incumbent", "change", "margin")]
    result = "pass" if r["passed"] else f"FAIL {r.get('reason', '')}".strip()
    return [r["metric"], f"{r['change_kind']} {r['op']} {r['value']:g}", *measured, result]


def markdown(metrics: dict, gate: dict | None, target: str) -> str:
    lines = [f"# lifecycle evaluate: {target}", ""]
    for title, header, rows in tables(metrics, gate):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    return "\n".join(lines)


def print_tables(metrics: dict, gate: dict | None, samples: list[dict], run_dir) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for title, header, rows in tables(metrics, gate):
        table = Table(title=title, title_justify="left")
        for column in header:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row, style="red" if row[-1].startswith("FAIL") else None)
        console.print(table)
    for s in samples:
        console.print(f"[dim]{s['prompt']!r} ->[/] {s['prompt'] + s['completion']!r}")
    verdict = f", gate {gate['verdict']}" if gate else ""
    console.print(f"[bold {'red' if gate and gate['verdict'] == 'fail' else 'green'}]evaluate[/] done{verdict} -> "
                  f"{run_dir}")


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    return str(x)
