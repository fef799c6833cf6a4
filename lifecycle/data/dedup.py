"""Exact (hash of normalised text) and near-duplicate (MinHash + LSH, datasketch) detection: the first document wins."""
from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH
from datasketch.minhash import _fmix

from lifecycle.errors import ConfigError

PUNCTUATION = re.compile(r"[^\w\s]+")  # punctuation and symbols: "Hello, world!" and "hello world" are one text
# The same for ASCII through str.translate, ~15x faster than the regex, which then runs on non-ASCII text only.
ASCII_PUNCTUATION = str.maketrans({c: " " for c in map(chr, range(128))
                                  if not (c.isalnum() or c == "_" or c.isspace())})
SCHEME = "affine64"  # datasketch's 64-bit permutations: h -> a * fmix64(h) + b mod 2**64
CHUNK = 4096  # shingles per block: bounds the (shingles, num_perm) matrix at 4 MB for num_perm 128


def words(text: str) -> list[str]:
    """The words of the normalised text (see normalize_for_hash)."""
    text = unicodedata.normalize("NFKC", text).lower().translate(ASCII_PUNCTUATION)
    return (text if text.isascii() else PUNCTUATION.sub(" ", text)).split()


def normalize_for_hash(text: str) -> str:
    """NFKC, lowercase, punctuation and symbols removed, whitespace collapsed to single spaces."""
    return " ".join(words(text))


def exact_key(text: str) -> bytes:
    """16-byte blake2b digest of the normalised text."""
    return hashlib.blake2b(normalize_for_hash(text).encode(), digest_size=16).digest()


class ExactDuplicates:
    """Remembers the first key of each distinct normalised text."""

    def __init__(self) -> None:
        self._first: dict[bytes, str] = {}

    def seen(self, key: str, text: str) -> str | None:
        """The key of an earlier document with the same normalised text, or None (this one is remembered)."""
        return self.seen_digest(key, exact_key(text))

    def seen_digest(self, key: str, digest: bytes) -> str | None:
        """`seen` for an exact_key computed elsewhere (in a worker process)."""
        first = self._first.setdefault(digest, key)
        return None if first == key else first


class NearDuplicates:
    """MinHash signatures of word shingles and an LSH index of the documents kept so far.

    `signature` is pure and picklable (run it in worker processes); `seen` must be called in document order.
    A pickled copy carries the settings but not the index.
    """

    def __init__(self, shingle_size: int, num_perm: int, threshold: float, bands: int | None, rows: int | None,
                 seed: int) -> None:
        if shingle_size < 1 or num_perm < 2 or not 0.0 < threshold <= 1.0:
            raise ConfigError(f"dedup needs shingle_size >= 1, num_perm >= 2 and 0 < threshold <= 1; got "
                              f"shingle_size={shingle_size}, num_perm={num_perm}, threshold={threshold}")
        if (bands is None) != (rows is None):
            raise ConfigError(f"dedup bands and rows are set together or both null; got bands={bands}, rows={rows}")
        if bands is None:  # datasketch's choice: minimises false positives + false negatives around the threshold
            chosen = MinHashLSH(threshold=threshold, num_perm=num_perm)
            bands, rows = chosen.b, chosen.r
        elif bands * rows != num_perm or bands < 2:
            raise ConfigError(f"dedup bands * rows must equal num_perm with bands >= 2; got bands={bands} * "
                              f"rows={rows} = {bands * rows}, num_perm={num_perm}")
        self.shingle_size, self.num_perm, self.threshold = shingle_size, num_perm, threshold
        self.bands, self.rows, self.seed = bands, rows, seed
        self._permutations = MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations  # (2, num_perm)
        # odd per-position multipliers: sum(word_hash[i + j] * weight[j]) hashes the shingle starting at word i
        self._weights = np.random.default_rng(seed).integers(0, 2**64, shingle_size, dtype=np.uint64) | np.uint64(1)
        self._index: MinHashLSH | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_index": None}

    def shingles(self, text: str) -> np.ndarray:
        """64-bit hashes of the word `shingle_size`-grams of the normalised text (one shingle if it is shorter)."""
        tokens = words(text)
        word_hashes = np.fromiter(map(zlib.crc32, map(str.encode, tokens)), dtype=np.uint64, count=len(tokens))
        n = max(1, len(tokens) - self.shingle_size + 1)
        hashes = np.zeros(n, dtype=np.uint64)
        for j, weight in enumerate(self._weights[:len(tokens)]):
            hashes += word_hashes[j:j + n] * weight  # wraps modulo 2**64, as intended
        return hashes

    def signature(self, text: str) -> np.ndarray:
        """The MinHash of the text's shingles: `num_perm` uint64 values.

        Equal to datasketch's `MinHash(num_perm, seed, hashfunc=int, scheme="affine64").update_batch(shingles)`
        without its Python loop over the shingles (tests/unit/test_dedup.py checks the equality).
        """
        a, b = self._permutations
        hashes = _fmix(self.shingles(text), 64)
        signature = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(hashes), CHUNK):
            block = hashes[start:start + CHUNK, None] * a + b  # (shingles, num_perm)
            np.minimum(signature, block.min(axis=0), out=signature)
        return signature

    def seen(self, key: str, signature: np.ndarray) -> str | None:
        """The key of the most similar kept document with estimated Jaccard >= threshold, or None (key is indexed)."""
        if self._index is None:
            self._index = MinHashLSH(num_perm=self.num_perm, params=(self.bands, self.rows))
        minhash = LeanMinHash(seed=self.seed, hashvalues=signature, scheme=SCHEME)
        banded = self._banded(signature)
        best, best_jaccard = None, self.threshold
        for candidate in sorted(self._index.query(minhash)):  # sorted: ties go to the same key on every run
            jaccard = np.count_nonzero(self._banded_of(candidate) == banded) / len(banded)
            if jaccard > best_jaccard or (best is None and jaccard == best_jaccard):
                best, best_jaccard = candidate, jaccard
        if best is None:
            self._index.insert(key, minhash)
        return best

    def _banded(self, signature: np.ndarray) -> np.ndarray:
        return np.frombuffer(signature[:self.bands * self.rows].byteswap().tobytes(), dtype=np.uint64)

    def _banded_of(self, key: str) -> np.ndarray:
        # A kept signature is read back from the band keys the LSH stores anyway (datasketch keeps each band as the
        # byte-swapped bytes of its values), so the index is the only memory held per document.
        return np.frombuffer(b"".join(self._index.keys.get(key)), dtype=np.uint64)
