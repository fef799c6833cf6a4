"""Rich progress bars for the data stage's passes: items, documents/s and MB/s."""
from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None, label: str, measure: Callable[[T], tuple[int, int]]) -> Iterator[T]:
    """Yield `items` while showing documents/s and MB/s; `measure(item)` gives (documents, bytes) per item."""
    columns = [TextColumn(f"[bold]{label:<9}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn()]
    started, docs, n_bytes = time.perf_counter(), 0, 0
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(label, total=total, rate="")
        for item in items:
            d, b = measure(item)
            docs, n_bytes = docs + d, n_bytes + b
            elapsed = max(1e-9, time.perf_counter() - started)
            bar.update(task, advance=1, rate=f"{docs / elapsed:,.0f} docs/s {n_bytes / elapsed / 2**20:,.2f} MB/s")
            yield item


def unit_size(result: dict) -> tuple[int, int]:
    return result.get("docs_in", 0), result.get("bytes_in", 0)


def doc_size(doc) -> tuple[int, int]:
    return 1, len(doc.text)
