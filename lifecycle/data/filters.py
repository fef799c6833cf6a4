"""Quality filters: Gopher rules for natural language, code rules, and a block list; each drop names its rule."""
from __future__ import annotations

import re
from collections import Counter
from itertools import compress
from pathlib import Path

from lifecycle.data.document import Document, Drop

# Words, with inner apostrophes ("don't"); punctuation tokens carry no weight in any rule, so they are not kept.
WORD = re.compile(r"\w+(?:['’]\w+)*")
LETTER = re.compile(r"[^\W\d_]")
LINE_BREAKS = re.compile(r"\n+")
PARAGRAPH_BREAKS = re.compile(r"\n{2,}")
BULLETS = ("•", "●", "○", "◦", "▪", "‣", "-", "*", "–")
ELLIPSES = ("...", "…")


class GopherQuality:
    """Rae et al. 2021 (Gopher), table A1: document-level quality and repetition rules; null disables one."""

    name = "gopher"

    def __init__(self, *, kinds: list[str] | None, min_words: int | None, max_words: int | None,
                 min_mean_word_length: float | None, max_mean_word_length: float | None,
                 max_symbol_word_ratio: float | None, max_bullet_lines_ratio: float | None,
                 max_ellipsis_lines_ratio: float | None, min_alpha_word_fraction: float | None,
                 min_stop_words: int | None, stop_words: list[str],
                 max_duplicate_line_fraction: float | None, max_duplicate_paragraph_fraction: float | None,
                 max_duplicate_line_char_fraction: float | None,
                 max_duplicate_paragraph_char_fraction: float | None,
                 max_top_ngram_char_fraction: dict[int, float], max_duplicate_ngram_char_fraction: dict[int, float],
                 ) -> None:
        self.kinds = None if kinds is None else list(kinds)
        self.min_words, self.max_words = min_words, max_words
        self.min_mean_word_length, self.max_mean_word_length = min_mean_word_length, max_mean_word_length
        self.max_symbol_word_ratio = max_symbol_word_ratio
        self.max_bullet_lines_ratio = max_bullet_lines_ratio
        self.max_ellipsis_lines_ratio = max_ellipsis_lines_ratio
        self.min_alpha_word_fraction = min_alpha_word_fraction
        self.min_stop_words = min_stop_words
        self.stop_words = frozenset(w.lower() for w in stop_words)
        self.max_duplicate_line_fraction = max_duplicate_line_fraction
        self.max_duplicate_paragraph_fraction = max_duplicate_paragraph_fraction
        self.max_duplicate_line_char_fraction = max_duplicate_line_char_fraction
        self.max_duplicate_paragraph_char_fraction = max_duplicate_paragraph_char_fraction
        self.max_top_ngram_char_fraction = {int(n): float(f) for n, f in max_top_ngram_char_fraction.items()}
        self.max_duplicate_ngram_char_fraction = {int(n): float(f)
                                                  for n, f in max_duplicate_ngram_char_fraction.items()}

    def __call__(self, doc: Document) -> Document | Drop:
        if self.kinds is not None and doc.kind not in self.kinds:
            return doc
        words = WORD.findall(doc.text.lower())
        reason = self.quality(doc.text, words) or self.repetition(doc.text, words)
        return Drop(reason) if reason else doc

    def quality(self, text: str, words: list[str]) -> str | None:
        """The first failed quality rule's reason code, or None."""
        n = len(words)
        if _below(n, self.min_words) or n == 0:
            return "too_few_words"
        if _above(n, self.max_words):
            return "too_many_words"
        mean_length = sum(map(len, words)) / n
        if _below(mean_length, self.min_mean_word_length):
            return "short_mean_word_length"
        if _above(mean_length, self.max_mean_word_length):
            return "long_mean_word_length"
        symbols = max(text.count("#"), text.count("...") + text.count("…"))
        if _above(symbols / n, self.max_symbol_word_ratio):
            return "symbol_word_ratio"
        lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
        if _above(sum(line.startswith(BULLETS) for line in lines) / len(lines), self.max_bullet_lines_ratio):
            return "bullet_lines"
        if _above(sum(line.endswith(ELLIPSES) for line in lines) / len(lines), self.max_ellipsis_lines_ratio):
            return "ellipsis_lines"
        if _below(sum(1 for w in words if LETTER.search(w)) / n, self.min_alpha_word_fraction):
            return "few_alpha_words"
        if _below(sum(w in self.stop_words for w in words), self.min_stop_words):
            return "few_stop_words"
        return None

    def repetition(self, text: str, words: list[str]) -> str | None:
        """The first failed repetition rule's reason code, or None."""
        size = max(1, len(text))
        paragraphs = [p.strip() for p in PARAGRAPH_BREAKS.split(text.strip())]
        dups, dup_chars = _duplicates(paragraphs)
        if _above(dups / len(paragraphs), self.max_duplicate_paragraph_fraction):
            return "dup_paragraph_fraction"
        if _above(dup_chars / size, self.max_duplicate_paragraph_char_fraction):
            return "dup_paragraph_char_fraction"
        lines = [line.strip() for line in LINE_BREAKS.split(text.strip())]
        dups, dup_chars = _duplicates(lines)
        if _above(dups / len(lines), self.max_duplicate_line_fraction):
            return "dup_line_fraction"
        if _above(dup_chars / size, self.max_duplicate_line_char_fraction):
            return "dup_line_char_fraction"
        word_chars = max(1, sum(map(len, words)))
        for n, limit in sorted(self.max_top_ngram_char_fraction.items()):
            if _top_ngram_chars(words, n) / word_chars > limit:
                return f"top_{n}gram"
        for n, limit in sorted(self.max_duplicate_ngram_char_fraction.items()):
            if _duplicate_ngram_chars(words, n) / word_chars > limit:
                return f"dup_{n}gram"
        return None


class CodeQuality:
    """Source-file rules in the spirit of Codex/StarCoder: line lengths, alphanumeric share, generated files."""

    name = "code"

    def __init__(self, *, kinds: list[str] | None, max_line_length: int | None, max_mean_line_length: float | None,
                 min_alnum_fraction: float | None, autogenerated_markers: list[str], header_lines: int) -> None:
        self.kinds = None if kinds is None else list(kinds)
        self.max_line_length = max_line_length
        self.max_mean_line_length = max_mean_line_length
        self.min_alnum_fraction = min_alnum_fraction
        self.autogenerated_markers = list(autogenerated_markers)
        self.header_lines = header_lines
        markers = "|".join(f"(?:{m})" for m in self.autogenerated_markers)
        self._generated = re.compile(markers, re.IGNORECASE | re.MULTILINE) if markers else None

    def __call__(self, doc: Document) -> Document | Drop:
        if self.kinds is not None and doc.kind not in self.kinds:
            return doc
        reason = self.check(doc.text)
        return Drop(reason) if reason else doc

    def check(self, text: str) -> str | None:
        """The first failed rule's reason code, or None."""
        lengths = [len(line) for line in text.splitlines()] or [0]
        if _above(max(lengths), self.max_line_length):
            return "long_line"
        if _above(sum(lengths) / len(lengths), self.max_mean_line_length):
            return "long_mean_line"
        if _below(sum(map(str.isalnum, text)) / max(1, len(text)), self.min_alnum_fraction):
            return "low_alnum_fraction"
        header = "\n".join(text.split("\n", self.header_lines)[:self.header_lines])
        if self._generated is not None and self._generated.search(header):
            return "autogenerated"
        return None


class BlockList:
    """Drop documents naming blocked terms (whole words, any case) more than `max_hits` times."""

    name = "blocklist"

    def __init__(self, *, kinds: list[str] | None, words: list[str], path: str | None, max_hits: int) -> None:
        self.kinds = None if kinds is None else list(kinds)
        self.words = list(words)
        self.path = path
        self.max_hits = max_hits
        terms = {w.strip().lower() for w in self.words + _read_terms(path) if w.strip()}
        # Longest first, so "bad word" wins over "bad" inside one alternation.
        alternation = "|".join(re.escape(t) for t in sorted(terms, key=lambda t: (-len(t), t)))
        self._regex = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE) if terms else None

    def __call__(self, doc: Document) -> Document | Drop:
        if self._regex is None or (self.kinds is not None and doc.kind not in self.kinds):
            return doc
        hits = 0
        for _ in self._regex.finditer(doc.text):
            hits += 1
            if hits > self.max_hits:
                return Drop("blocked_term")
        return doc


def _read_terms(path: str | None) -> list[str]:
    """One term a line; '#' starts a comment."""
    if not path:
        return []
    lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines]


def _below(value: float, limit: float | None) -> bool:
    return limit is not None and value < limit


def _above(value: float, limit: float | None) -> bool:
    return limit is not None and value > limit


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(how many items repeat an earlier one, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    """Characters (word characters only) covered by every occurrence of the most frequent n-gram."""
    grams = Counter(zip(*(words[i:] for i in range(n))))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return count * sum(map(len, gram)) if count > 1 else 0


def _duplicate_ngram_chars(words: list[str], n: int) -> int:
    """Characters of the words covered by any n-gram that occurs more than once (Gopher's definition)."""
    grams = list(zip(*(words[i:] for i in range(n))))
    counts = Counter(grams)
    if not grams or counts.most_common(1)[0][1] < 2:
        return 0
    covered = bytearray(len(words))
    for start in compress(range(len(grams)), map((1).__lt__, map(counts.__getitem__, grams))):
        covered[start:start + n] = b"\x01" * n
    return sum(len(w) for w, hit in zip(words, covered) if hit)
