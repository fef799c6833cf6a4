"""A rich progress bar for the data stage's unit processing: units, documents/s and MB/s."""
from __future__ import annotations

import time
from typing import Iterable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def progress(results: Iterable[dict], total: int, label: str) -> Iterator[dict]:
    """Yield `results` (unit stats dicts) while showing documents/s and MB/s read so far."""
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn()]
    started, docs, n_bytes = time.perf_counter(), 0, 0
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(label, total=total, rate="")
        for result in results:
            docs += result.get("docs_in", 0)
            n_bytes += result.get("bytes_in", 0)
            elapsed = max(1e-9, time.perf_counter() - started)
            bar.update(task, advance=1, rate=f"{docs / elapsed:,.0f} docs/s {n_bytes / elapsed / 2**20:,.2f} MB/s")
            yield result
