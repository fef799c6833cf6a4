"""The data stage's report: documents and bytes in/out per source, step and reason, and its W&B tables."""
from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lifecycle.data.document import Skips

log = logging.getLogger(__name__)


class Report:
    def __init__(self) -> None:
        self.units: list[tuple[str, str, str]] = []          # (source, key, fingerprint)
        self.seconds: dict[str, float] = {}
        self.sources: dict[str, Counter] = defaultdict(Counter)
        self.steps: dict[str, Counter] = defaultdict(Counter)
        self.drops: dict[str, Counter] = defaultdict(Counter)  # "step/reason" -> docs, bytes
        self.samples: dict[str, list] = defaultdict(list)
        self.read_skips, self.pii = Skips(), Counter()
        self.selection: dict[str, Any] = {}
        self.tokens: dict[str, int] = {}
        self.instruct: dict[str, int] = {}
        self.vocab_size = 0

    @contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 2)

    def add_units(self, results: list[dict]) -> None:
        for r in results:
            src = self.sources[r["source"]]
            src.update({"units": 1, "cached_units": int(r["cached"]), "docs_in": r.get("docs_in", 0),
                        "bytes_in": r.get("bytes_in", 0), "docs_out": r.get("docs_out", 0),
                        "bytes_out": r.get("bytes_out", 0)})
            for k, v in r.items():
                if ":" in k:  # "<step>:docs_in" etc.
                    step, what = k.split(":", 1)
                    self.steps[step][what] += v
            for reason, c in r["drops"].items():
                self.drops[reason].update(c)
            for reason, rows in r["samples"].items():
                self.samples[reason].extend(rows[: max(0, 3 - len(self.samples[reason]))])
            skips = Skips()
            for reason, info in r["skips"].items():
                skips.counts[reason] = info["count"]
                skips.examples[reason] = list(info["first"])
            self.read_skips.merge(skips)
            self.pii.update(r["pii"])

    def log_skips(self) -> None:
        """Bad input, by reason with the first locations, into the run's log (the report has them all)."""
        for reason, info in self.read_skips.to_dict().items():
            log.warning("skipped %d input item(s) as %s; first at %s", info["count"], reason, ", ".join(info["first"]))

    @property
    def docs_in(self) -> int:
        return sum(s["docs_in"] for s in self.sources.values())

    @property
    def docs_out(self) -> int:
        return sum(s["docs_out"] for s in self.sources.values())

    def add_selection(self, selected: dict) -> None:
        self.selection = {"docs": selected["docs"], "removed": selected["removed"],
                          "shards": {s: [p.name for p in ps] for s, ps in selected["paths"].items()}}
        for reason, c in selected["removed"].items():
            self.drops[reason].update(c)

    def to_dict(self) -> dict[str, Any]:
        return {"sources": {k: dict(v) for k, v in self.sources.items()},
                "read_skips": self.read_skips.to_dict(),
                "steps": {k: dict(v) for k, v in self.steps.items()},
                "removed": {k: dict(v) for k, v in sorted(self.drops.items())},
                "removed_samples": dict(self.samples), "pii_replaced": dict(self.pii),
                "selection": self.selection, "tokens": self.tokens, "instruct": self.instruct,
                "seconds": self.seconds}

    def metrics(self, seconds: float) -> dict[str, Any]:
        bytes_in = sum(s["bytes_in"] for s in self.sources.values())
        kept = self.selection.get("docs", {})
        out = {"data/docs_in": self.docs_in, "data/docs_kept": sum(kept.values()), "data/bytes_in": bytes_in,
               "data/train_docs": kept.get("train", 0), "data/val_docs": kept.get("val", 0),
               "data/train_tokens": self.tokens.get("train", 0), "data/val_tokens": self.tokens.get("val", 0),
               "data/vocab_size": self.vocab_size, "data/read_skipped": sum(self.read_skips.counts.values()),
               "data/pii_replaced": sum(self.pii.values()),
               "data/instruct_train": self.instruct.get("train", 0), "data/instruct_val": self.instruct.get("val", 0),
               "data/seconds": round(seconds, 2),
               "data/process_mb_per_s": round(bytes_in / 2**20 / max(1e-9, self.seconds.get("process", 0)), 3)}
        out.update({f"data/removed/{r}": c["docs"] for r, c in sorted(self.drops.items())})
        return out

    def log_tables(self, logger) -> None:
        """The removals by reason and a sample of removed documents, as W&B tables."""
        if not hasattr(logger, "log_table"):
            return
        rows = [[r, c["docs"], c["bytes"]] for r, c in sorted(self.drops.items())]
        logger.log_table(key="data/removed", columns=["reason", "docs", "bytes"], data=rows)
        samples = [[r, s["id"], s["text"]] for r, ss in sorted(self.samples.items()) for s in ss]
        logger.log_table(key="data/removed_samples", columns=["reason", "id", "text"], data=samples)

    def print_summary(self, run_dir: Path) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="lifecycle data: documents removed by reason")
        for col in ("reason", "docs", "MB"):
            table.add_column(col, justify="right" if col != "reason" else "left")
        for reason, c in sorted(self.drops.items()):
            table.add_row(reason, f"{c['docs']:,}", f"{c['bytes'] / 2**20:.2f}")
        console = Console()
        console.print(table)
        kept = self.selection.get("docs", {})
        console.print(f"[bold green]data[/] {self.docs_in:,} documents read, {kept.get('train', 0):,} train / "
                      f"{kept.get('val', 0):,} val kept, {self.tokens.get('train', 0):,} train / "
                      f"{self.tokens.get('val', 0):,} val tokens, vocab {self.vocab_size:,}, "
                      f"{self.instruct.get('train', 0):,} instruction pairs -> {run_dir}")
