"""A Hydra callback: after `lifecycle cost -m cost/hardware=a100,h100,h200`, one table with a row per job."""
from __future__ import annotations

import json
from pathlib import Path

from hydra.experimental.callback import Callback

COLUMNS = ("cost/pretrain/usd", "cost/finetune/usd", "cost/inference/usd_per_1k", "cost/total_usd", "cost/roi",
           "cost/payback_months", "projection/usd", "projection/days")


def table(manifests: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the jobs' headline figures, one row per job."""
    from lifecycle.cost.report import fmt

    header = ["hardware", *COLUMNS]
    rows = [[m["metrics"].get("hardware", "?"), *(fmt(k, m["metrics"].get(k)) for k in COLUMNS)] for m in manifests]
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


class WhatIfTable(Callback):
    """Writes <sweep dir>/whatif.md and prints it, from the manifests of the sweep's finished jobs."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        paths = sorted(sweep.glob("*/manifest.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit()
                       else 0)
        manifests = [json.loads(p.read_text()) for p in paths]
        manifests = [m for m in manifests if m.get("stage") == "cost"]
        if not manifests:
            return
        text = markdown(*table(manifests))
        (sweep / "whatif.md").write_text(text)
        print(f"\nwhat-if over {len(manifests)} runs ({sweep}/whatif.md):\n{text}")
