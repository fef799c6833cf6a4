"""The corpus profile: token, length and kind distributions, the monitoring stage's drift reference."""
from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np

# Log-spaced length bins shared by every profile, so live traffic can be binned the same way.
LENGTH_BINS = [0, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 2**62]
RESERVOIR = 100_000  # documents sampled for quantiles: memory stays bounded whatever the corpus size


class Profile:
    """Accumulates per-document statistics while the shards are written, in memory bounded by the vocabulary."""

    def __init__(self, vocab_size: int, seed: int = 0):
        self.token_counts = np.zeros(vocab_size, dtype=np.int64)
        self.tokens_hist = np.zeros(len(LENGTH_BINS) - 1, dtype=np.int64)
        self.chars_hist = np.zeros(len(LENGTH_BINS) - 1, dtype=np.int64)
        self.sample: list[tuple[int, int]] = []  # (tokens, chars) of a uniform reservoir sample of documents
        self.documents = 0
        self.kinds: Counter[str] = Counter()
        self.kind_tokens: Counter[str] = Counter()
        self._rng = random.Random(seed)

    def add(self, kind: str, n_chars: int, ids: np.ndarray) -> None:
        self.token_counts += np.bincount(ids, minlength=len(self.token_counts))[: len(self.token_counts)]
        self.tokens_hist[_bin(ids.size)] += 1
        self.chars_hist[_bin(n_chars)] += 1
        self.documents += 1
        if len(self.sample) < RESERVOIR:
            self.sample.append((int(ids.size), n_chars))
        elif (j := self._rng.randrange(self.documents)) < RESERVOIR:
            self.sample[j] = (int(ids.size), n_chars)
        self.kinds[kind] += 1
        self.kind_tokens[kind] += int(ids.size)

    def to_dict(self) -> dict[str, Any]:
        sample = np.asarray(self.sample or [(0, 0)])
        total = max(1, int(self.token_counts.sum()))
        return {
            "documents": self.documents,
            "tokens": int(self.token_counts.sum()),
            "length_bins": LENGTH_BINS,
            "doc_tokens_hist": self.tokens_hist.tolist(),
            "doc_chars_hist": self.chars_hist.tolist(),
            "doc_tokens_quantiles": _quantiles(sample[:, 0]) if self.sample else {},
            "doc_chars_quantiles": _quantiles(sample[:, 1]) if self.sample else {},
            "kind_share_docs": {k: v / max(1, self.documents) for k, v in sorted(self.kinds.items())},
            "kind_share_tokens": {k: v / total for k, v in sorted(self.kind_tokens.items())},
            "token_frequencies": self.token_counts.tolist(),
        }


def _bin(value: int) -> int:
    return int(np.searchsorted(LENGTH_BINS, value, side="right")) - 1


def _quantiles(values: np.ndarray) -> dict[str, float]:
    qs = [0.01, 0.1, 0.5, 0.9, 0.99]
    return {f"p{int(q * 100)}": float(v) for q, v in zip(qs, np.quantile(values, qs))}
