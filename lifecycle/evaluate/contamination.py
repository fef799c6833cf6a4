"""Contamination: the share of each task's items that share a long word n-gram with the training corpus."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from lifecycle.data.corpus_writer import read_shards
from lifecycle.data.decontam import ngram_hashes
from lifecycle.errors import DataError


def shares(texts: dict[str, list[str]], data_dir: Path, ngram: int) -> dict[str, float]:
    """{task: contaminated items / items} against the data run's clean/train-*.jsonl.gz.

    The items' n-grams are indexed (small) and the corpus streams past them once, so memory stays bounded by the
    tasks, not by the corpus.
    """
    paths = sorted((Path(data_dir) / "clean").glob("train-*.jsonl.gz"))
    if not paths:
        raise DataError(f"{data_dir}/clean: no train-*.jsonl.gz to check contamination against; point data.dir at "
                        "a finished `lifecycle data` run")
    owners: dict[bytes, set[tuple[str, int]]] = defaultdict(set)
    for task, items in texts.items():
        for i, text in enumerate(items):
            for gram in ngram_hashes(text, ngram):
                owners[gram].add((task, i))
    hit: set[tuple[str, int]] = set()
    if owners:
        for doc in read_shards(paths):
            for gram in ngram_hashes(doc.text, ngram):
                if gram in owners:
                    hit |= owners[gram]
    return {task: sum((task, i) in hit for i in range(len(items))) / len(items) if items else 0.0
            for task, items in texts.items()}
