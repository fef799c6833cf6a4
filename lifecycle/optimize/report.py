"""The optimization report: one row per model (the base and each variant), as a console table, markdown, JSON and
a PNG of quality against speed. A multirun's jobs each add a row; the report gathers the rows of its sweep."""
from __future__ import annotations

import json
from pathlib import Path

from lifecycle import artifacts

ROW, BASE = "row.json", "base_row.json"
COLUMNS = {"variant": "variant", "params": "params", "size_mb": "size MB", "ppl_general": "ppl general",
           "ppl_general_change": "Δ general", "ppl_domain": "ppl domain", "ppl_domain_change": "Δ domain",
           "ttft_ms": "TTFT ms", "peak_mb": "peak MB", "warmup_s": "warm-up s", "load_avg": "load avg"}


def with_changes(row: dict, base: dict) -> dict:
    """The row with its perplexity changes relative to the base (+0.01 = 1% worse)."""
    return {**row, **{f"{k}_change": row[k] / base[k] - 1 for k in ("ppl_general", "ppl_domain")}}


def gather(directory: Path) -> list[dict]:
    """The base row and every job's row below a sweep directory, in job order."""
    rows = [json.loads(p.read_text()) for p in sorted(Path(directory).glob(f"*/{ROW}"),
                                                       key=lambda p: (len(p.parent.name), p.parent.name))]
    base = Path(directory) / BASE
    return ([json.loads(base.read_text())] if base.is_file() else []) + rows


def columns(rows: list[dict]) -> dict[str, str]:
    """COLUMNS plus one tokens/s column per measured batch size, in the rows' order."""
    speed = {k: f"tok/s b{k.removeprefix('tok_s_b')}" for k in rows[0] if k.startswith("tok_s_b")}
    head = dict(list(COLUMNS.items())[:7])
    return {**head, **speed, **dict(list(COLUMNS.items())[7:])}


def cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key.endswith("_change"):
        return f"{value:+.2%}"
    if key == "params":
        return f"{value:,}"
    return f"{value:,.2f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
    cols = columns(rows)
    lines = ["| " + " | ".join(cols.values()) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(k, r.get(k)) for k in cols) + " |" for r in rows]
    passes = [f"- **{r['variant']}**: {r['passes']}" for r in rows]
    return "# Optimization report\n\n" + "\n".join(lines) + "\n\n" + "\n".join(passes) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """General perplexity against batch-1 decode speed, one labelled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = next(k for k in rows[0] if k.startswith("tok_s_b"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r[speed], r["ppl_general"], marker="*" if r["variant"] == "base" else "o", s=80)
        ax.annotate(r["variant"], (r[speed], r["ppl_general"]), textcoords="offset points", xytext=(5, 5))
    ax.set(xlabel=f"decode tokens/s ({columns(rows)[speed]})", ylabel="perplexity (general, lower is better)",
           title="Quality against speed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(rows: list[dict], directory: Path) -> None:
    """report.md, report.json and quality_speed.png in `directory`."""
    artifacts.atomic_write(Path(directory) / "report.md", markdown(rows))
    artifacts.write_json(Path(directory) / "report.json", rows)
    plot(rows, Path(directory) / "quality_speed.png")


def print_table(rows: list[dict], where: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = columns(rows)
    table = Table(title=f"lifecycle optimize -> {where}")
    for title in cols.values():
        table.add_column(title, justify="left" if title == "variant" else "right")
    for r in rows:
        table.add_row(*(cell(k, r.get(k)) for k in cols))
    Console().print(table)


def log(logger, rows: list[dict]) -> None:
    """The table to W&B (a wandb.Table through Lightning's logger), when the logger is W&B."""
    if hasattr(logger, "log_table"):
        cols = columns(rows)
        logger.log_table(key="optimize/report", columns=list(cols.values()),
                         data=[[r.get(k) for k in cols] for r in rows])
