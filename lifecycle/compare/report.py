"""The comparison table: every column in compare.csv, the configured ones on the console and in compare.md;
the plots: training-loss curves overlaid and one bar chart per configured metric."""
from __future__ import annotations

import csv
import io
from fnmatch import fnmatch
from pathlib import Path

from lifecycle import artifacts

IDENTITY = ("run", "stage", "group", "strategy", "created", "lineage")


def all_columns(rows: list[dict]) -> list[str]:
    """Identity columns first, then every other key in order of first appearance."""
    seen = dict.fromkeys(IDENTITY)
    for r in rows:
        seen |= dict.fromkeys(r)
    return list(seen)


def select(rows: list[dict], patterns: list[str]) -> list[str]:
    """The columns matching `patterns` (globs allowed: eval/task/*/acc), in pattern order, present in some row."""
    names = all_columns(rows)
    out: list[str] = []
    for pattern in patterns:
        out += [n for n in names if fnmatch(n, pattern) and n not in out and any(r.get(n) not in (None, "")
                                                                               for r in rows)]
    return out


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.5g}" if abs(value) < 1e5 else f"{value:.4e}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=all_columns(rows), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def to_markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)).replace("|", "/") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], columns: list[str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, overflow="fold", justify="left" if c in IDENTITY else "right")
    for r in rows:
        table.add_row(*(cell(r.get(c)) for c in columns))
    Console(width=max(120, 14 * len(columns))).print(table)


def write(run_dir: Path, rows: list[dict], columns: list[str]) -> None:
    artifacts.atomic_write(run_dir / "compare.csv", to_csv(rows))
    artifacts.atomic_write(run_dir / "compare.md", to_markdown(rows, columns))


def plot_losses(curves: dict[str, list[dict]], path: Path) -> bool:
    """train/loss (lines) and val/loss (markers) per step, one colour per run; False when no run has a history."""
    curves = {k: v for k, v in curves.items() if any("train/loss" in h or "val/loss" in h for h in v)}
    if not curves:
        return False
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(8, 4.5))
    for label, hist in curves.items():
        train = [(h["step"], h["train/loss"]) for h in hist if h.get("train/loss") is not None]
        val = [(h["step"], h["val/loss"]) for h in hist if h.get("val/loss") is not None]
        line = ax.plot(*zip(*train), label=label, linewidth=1)[0] if train else None
        if val:
            ax.plot(*zip(*val), "o--", color=line.get_color() if line else None, markersize=4,
                    label=None if line else label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (lines: train, markers: val)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(figure, path)
    return True


def plot_bars(rows: list[dict], columns: list[str], path: Path) -> bool:
    """One horizontal bar chart per numeric column, a bar per row; False when no column is numeric."""
    numeric = [c for c in columns if any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)
                                         for r in rows)]
    if not numeric:
        return False
    plt = _pyplot()
    cols = min(3, len(numeric))
    grid = (-(-len(numeric) // cols), cols)
    figure, axes = plt.subplots(*grid, figsize=(3.4 * cols + 2.5, grid[0] * (0.35 * len(rows) + 1.2)), sharey=True,
                                squeeze=False)
    labels = [label(r) for r in rows]
    for ax, c in zip(axes.flat, numeric):
        values = [r.get(c) if isinstance(r.get(c), (int, float)) else 0 for r in rows]
        bars = ax.barh(labels, values)
        ax.bar_label(bars, labels=[cell(r.get(c)) for r in rows], fontsize=7, padding=2)
        ax.set_title(c, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.margins(x=0.25)
    axes.flat[0].invert_yaxis()
    for ax in list(axes.flat)[len(numeric):]:
        ax.set_visible(False)
    _save(figure, path)
    return True


def label(row: dict) -> str:
    """A short name for a row in plots: stage, strategy or variant, run directory name."""
    parts = (row["stage"], row.get("strategy") or "", str(row.get("optimize/variant") or ""), Path(row["run"]).name)
    return " ".join(x for x in parts if x)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
