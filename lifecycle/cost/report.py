"""The cost report: one table (console and markdown) of every figure with its source or why it is missing,
a JSON of the same, a chart of the cost breakdown against the benefit, and the bill."""
from __future__ import annotations

import json
from pathlib import Path

from lifecycle import artifacts
from lifecycle.cost.figures import Figures

SECTIONS = {
    "measured": ["data/wall_hours", "pretrain/params", "pretrain/tokens", "pretrain/mfu", "pretrain/wall_hours",
                 "finetune/params", "finetune/tokens", "finetune/mfu", "finetune/wall_hours", "finetune/examples",
                 "serve/tokens_per_s", "serve/latency_ms"],
    "cost": ["cost/data/usd", "cost/pretrain/flops", "cost/pretrain/device_hours", "cost/pretrain/usd",
             "cost/pretrain/as_run_usd", "cost/finetune/flops", "cost/finetune/device_hours", "cost/finetune/usd",
             "cost/finetune/as_run_usd", "cost/labelling/usd", "cost/inference/usd_per_1k",
             "cost/inference/usd_per_month", "cost/pretraining_usd", "cost/finetuning_usd", "cost/inference_usd",
             "cost/total_usd", "cost/benefit_usd", "cost/roi", "cost/payback_months"],
    "projection": ["projection/flops", "projection/device_hours", "projection/usd", "projection/days",
                   "projection/train_state_gb_per_device"],
}
BREAKDOWN = {"data": "cost/data/usd", "pretraining": "cost/pretrain/usd", "fine-tuning": "cost/finetune/usd",
             "labelling": "cost/labelling/usd", "inference": "cost/inference_usd", "benefit": "cost/benefit_usd"}


def fmt(key: str, value: float | None) -> str:
    """A figure as people read it: dollars, ratios, FLOPs, counts."""
    if value is None:
        return "missing"
    if "usd" in key:
        return f"${value:.3g}" if abs(value) < 0.01 else f"${value:,.2f}"
    if key.endswith(("/roi", "/mfu")):
        return f"{value:.1%}"
    if key.endswith(("flops", "/params", "/tokens")):
        return f"{value:.3g}"
    return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"


def rows(fig: Figures) -> list[tuple[str, str, str, str]]:
    """(section, figure, value, source or reason) for every figure of the report."""
    return [(section, k, fmt(k, v), src) for section, keys in SECTIONS.items() for k, v, src in fig.rows(keys)]


def markdown(fig: Figures, title: str) -> str:
    lines = [f"# {title}", "", "| section | figure | value | source |", "|---|---|---|---|"]
    lines += [f"| {s} | `{k}` | {v} | {src.replace('|', '/')} |" for s, k, v, src in rows(fig)]
    return "\n".join(lines) + "\n"


def print_table(fig: Figures, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col in ("section", "figure", "value", "source (or why it is missing)"):
        table.add_column(col, overflow="fold")
    for s, k, v, src in rows(fig):
        table.add_row(s, k, v if v != "missing" else "[yellow]missing[/]", src)
    Console(width=200).print(table)


def write(run_dir: Path, fig: Figures, title: str, notes: list[str]) -> None:
    """cost.json, cost.md and cost.png in the run directory."""
    artifacts.write_json(run_dir / "cost.json", {"values": fig.values, "sources": fig.sources,
                                                  "missing": fig.missing, "notes": notes})
    notes_md = "".join(f"- {n}\n" for n in notes)
    artifacts.atomic_write(run_dir / "cost.md", markdown(fig, title) + ("\n" + notes_md if notes else ""))
    chart(fig, run_dir / "cost.png", title)


def chart(fig: Figures, path: Path, title: str) -> None:
    """Horizontal bars (log scale) of each cost component and the benefit; missing ones are labelled so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(BREAKDOWN)
    values = [fig.get(BREAKDOWN[n]) for n in names]
    figure, ax = plt.subplots(figsize=(8, 3.6))
    shown = [v if v and v > 0 else 0 for v in values]
    ax.barh(names, shown, color=["#888"] * 5 + ["#2a7"])
    for i, v in enumerate(values):
        if v is None:  # x in axes coordinates, y in data: at the left edge whatever the scale
            ax.text(0.01, i, "missing", va="center", fontsize=8, color="#b60", transform=ax.get_yaxis_transform())
        else:
            ax.text(max(shown[i], 1e-6), i, f" {fmt('usd', v)}", va="center", fontsize=8)
    if any(shown):
        ax.set_xscale("log")
    ax.invert_yaxis()
    payback = fig.get("cost/payback_months")
    projected = fig.get("projection/usd")
    ax.set_title(f"{title}\nROI {fmt('cost/roi', fig.get('cost/roi'))}, payback "
                 f"{'missing' if payback is None else f'{payback:.3g} months'}; projected pretraining "
                 f"{fmt('usd', projected)} ({fmt('days', fig.get('projection/days'))} days)", fontsize=9)
    ax.set_xlabel("USD (log scale)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def bill_markdown(lines: list[dict], due: dict[str, float], since: str, until: str) -> str:
    out = [f"# Bill {since} .. {until}", "", "| key | model | requests | errors | prompt tokens | completion tokens | "
           "prompt $ | completion $ | total $ |", "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {x['key_id']} | {x['model']} | {x['requests']} | {x['errors']} | {x['prompt_tokens']:,} | "
            f"{x['completion_tokens']:,} | {x['prompt_usd']:.6f} | {x['completion_usd']:.6f} | {x['total_usd']:.6f} |"
            for x in lines]
    out += ["", "| key | amount due $ |", "|---|---|"] + [f"| {k} | {v:.6f} |" for k, v in due.items()]
    return "\n".join(out) + "\n"


def write_bill(run_dir: Path, lines: list[dict], due: dict[str, float], since: str, until: str) -> str:
    """bill.json and bill.md; returns the markdown (printed as is)."""
    artifacts.write_json(run_dir / "bill.json", {"since": since, "until": until, "lines": lines, "due": due})
    text = bill_markdown(lines, due, since, until)
    artifacts.atomic_write(run_dir / "bill.md", text)
    return text


def load(run_dir: Path) -> dict:
    return json.loads((run_dir / "cost.json").read_text())
