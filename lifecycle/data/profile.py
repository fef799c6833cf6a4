"""The corpus profile: token, length and kind distributions, the monitoring stage's drift reference."""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

# Log-spaced length bins shared by every profile, so live traffic can be binned the same way.
LENGTH_BINS = [0, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 2**62]


class Profile:
    """Accumulates per-document statistics while the shards are written."""

    def __init__(self, vocab_size: int):
        self.token_counts = np.zeros(vocab_size, dtype=np.int64)
        self.doc_tokens: list[int] = []
        self.doc_chars: list[int] = []
        self.kinds: Counter[str] = Counter()
        self.kind_tokens: Counter[str] = Counter()

    def add(self, kind: str, n_chars: int, ids: np.ndarray) -> None:
        self.token_counts += np.bincount(ids, minlength=len(self.token_counts))[: len(self.token_counts)]
        self.doc_tokens.append(int(ids.size))
        self.doc_chars.append(n_chars)
        self.kinds[kind] += 1
        self.kind_tokens[kind] += int(ids.size)

    def to_dict(self) -> dict[str, Any]:
        tokens, chars = np.asarray(self.doc_tokens), np.asarray(self.doc_chars)
        total = max(1, int(self.token_counts.sum()))
        return {
            "documents": len(tokens),
            "tokens": int(self.token_counts.sum()),
            "length_bins": LENGTH_BINS,
            "doc_tokens_hist": np.histogram(tokens, bins=LENGTH_BINS)[0].tolist(),
            "doc_chars_hist": np.histogram(chars, bins=LENGTH_BINS)[0].tolist(),
            "doc_tokens_quantiles": _quantiles(tokens),
            "doc_chars_quantiles": _quantiles(chars),
            "kind_share_docs": {k: v / max(1, len(tokens)) for k, v in sorted(self.kinds.items())},
            "kind_share_tokens": {k: v / total for k, v in sorted(self.kind_tokens.items())},
            "token_frequencies": self.token_counts.tolist(),
        }


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    qs = np.quantile(values, [0.01, 0.1, 0.5, 0.9, 0.99])
    return {f"p{int(q * 100)}": float(v) for q, v in zip([0.01, 0.1, 0.5, 0.9, 0.99], qs)}
