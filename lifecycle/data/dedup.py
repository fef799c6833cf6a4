"""Exact (hash of normalised text) and near-duplicate (MinHash + LSH, datasketch) detection: the first document wins."""
from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH
from datasketch.minhash import _fmix

from lifecycle.errors import ConfigError

PUNCTUATION = re.compile(r"[^\w\s]+")  # punctuation and symbols: "Hello, world!" and "hello world" are one text
# The same for ASCII through str.translate, ~15x faster than the regex, which then runs on non-ASCII text only.
ASCII_PUNCTUATION = str.maketrans({c: " " for c in map(chr, range(128))
                                  if not (c.isalnum() or c == "_" or c.isspace())})
WORD_OR_PUNCTUATION = re.compile(r"\w+|[^\w\s]+")
TOKENS = ("words", "punctuation")  # NearDuplicates' `tokens`, see conf/dedup/minhash.yaml
SCHEME = "affine64"  # datasketch's 64-bit permutations: h -> a * fmix64(h) + b mod 2**64
CHUNK = 1024  # shingles per block: the (num_perm, CHUNK) scratch buffer, 1 MB at num_perm 128, stays in L2
# numpy copies broadcast rows shorter than a third of its buffer size (8192) through buffers, which takes longer than
# the arithmetic on them: signature sets this size while it runs (1.0 instead of 1.7 ns per shingle and permutation)
BUFSIZE = 64
# A token's hash is sum((byte + 1) * RADIX**i) mod 2**64 over its lowercase UTF-8 bytes: a polynomial hash that numpy
# computes for every token of a text at once from one prefix sum (see NearDuplicates.token_hashes).
RADIX = 0x9E3779B97F4A7C15  # odd, so invertible mod 2**64
CACHED_POWERS = 1 << 20  # RADIX**±i kept for texts up to 1 MB (16 MB); a longer text computes its own


def _byte_values(kind: str) -> bytes:
    """bytes.translate table: 0 for a byte that separates tokens, else its lowercase + 1. Bytes >= 128 are parts of
    UTF-8 characters, inside a token. Kind "words" also separates at punctuation, as `words` does."""
    def value(b: int) -> int:
        if b >= 128:
            return min(b + 1, 255)  # 0xff never occurs in UTF-8
        c = chr(b)
        return 0 if c.isspace() or (kind == "words" and not (c.isalnum() or c == "_")) else ord(c.lower()) + 1
    return bytes(map(value, range(256)))


BYTE_VALUES = {kind: _byte_values(kind) for kind in TOKENS}
# bytes.translate tables of byte classes, 0 separator, 1 word, 2 punctuation: a token is a run of one class (ASCII text)
BYTE_CLASSES = {kind: bytes(0 if v == 0 else 1 if kind == "words" or chr(b).isalnum() or chr(b) == "_" else 2
                            for b, v in enumerate(BYTE_VALUES[kind])) for kind in TOKENS}


def _powers(n: int) -> np.ndarray:
    """(2, n): RADIX**i and RADIX**-i mod 2**64 for i < n."""
    powers = np.empty((2, n), dtype=np.uint64)
    powers[:, :1], powers[:, 1:] = 1, [[RADIX], [pow(RADIX, -1, 2**64)]]
    return np.multiply.accumulate(powers, axis=1, out=powers)  # wraps modulo 2**64, as intended


def words(text: str) -> list[str]:
    """The words of the normalised text (see normalize_for_hash)."""
    text = unicodedata.normalize("NFKC", text).lower().translate(ASCII_PUNCTUATION)
    return (text if text.isascii() else PUNCTUATION.sub(" ", text)).split()


def tokens(text: str, kind: str) -> list[str]:
    """`words`, or (kind "punctuation") the words and each run of punctuation and symbols of the NFKC-lowercased text:
    an edited word then changes a smaller share of the shingles."""
    if kind == "words":
        return words(text)
    return WORD_OR_PUNCTUATION.findall(unicodedata.normalize("NFKC", text).lower())


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
    """MinHash signatures of token shingles and an LSH index of the documents kept so far.

    `signature` is pure and picklable (run it in worker processes; not in threads: it reuses one scratch buffer);
    `seen` must be called in document order. A pickled copy carries the settings but not the index.
    """

    def __init__(self, shingle_size: int, num_perm: int, threshold: float, bands: int | None, rows: int | None,
                 seed: int, tokens: str) -> None:
        if tokens not in TOKENS:
            raise ConfigError(f"dedup tokens must be one of {', '.join(TOKENS)}; got {tokens!r}")
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
        self.bands, self.rows, self.seed, self.tokens = bands, rows, seed, tokens
        self._permutations = MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations  # (2, num_perm)
        # odd per-position multipliers: sum(token_hash[i + j] * weight[j]) hashes the shingle starting at token i
        self._weights = np.random.default_rng(seed).integers(0, 2**64, shingle_size, dtype=np.uint64) | np.uint64(1)
        self._start_empty()

    def _start_empty(self) -> None:
        self._index: MinHashLSH | None = None
        self._powers = _powers(0)  # grown as longer texts come (see _powers_upto)
        self._block = np.empty(self.num_perm * CHUNK, dtype=np.uint64)  # signature's scratch: no allocation per text

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_index", "_powers", "_block")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._start_empty()

    def token_hashes(self, text: str) -> np.ndarray:
        """64-bit hashes of `tokens(text, self.tokens)` (see RADIX), without a Python loop over the tokens."""
        # a separator first, so that every token starts where the byte class changes
        if text.isascii():  # NFKC leaves ASCII as it is; the byte tables lowercase and split it
            raw = b" " + text.encode()
            values = np.frombuffer(raw.translate(BYTE_VALUES[self.tokens]), dtype=np.uint8)
            classes = np.frombuffer(raw.translate(BYTE_CLASSES[self.tokens]), dtype=np.uint8)
        else:  # the tokens, separated by spaces
            raw = b" " + " ".join(tokens(text, self.tokens)).encode()
            values = np.frombuffer(raw.translate(BYTE_VALUES["punctuation"]), dtype=np.uint8)
            classes = values != 0
        bounds = np.ones(len(raw) + 1, dtype=bool)  # the token starts, then the end
        np.not_equal(classes[1:], classes[:-1], out=bounds[1:-1])
        bounds[:-1] &= classes != 0
        bounds = np.flatnonzero(bounds)
        powers, inverses = self._powers_upto(len(raw))  # (n,) each
        prefix = np.zeros(len(raw) + 1, dtype=np.uint64)
        np.cumsum(values * powers, out=prefix[1:])  # separators add 0: a token's sum runs up to the next start
        at_bounds = prefix[bounds]
        return (at_bounds[1:] - at_bounds[:-1]) * inverses[bounds[:-1]]  # each shifted back to start at RADIX**0

    def _powers_upto(self, n: int) -> np.ndarray:
        """_powers(n), from a cache grown by doubling up to CACHED_POWERS."""
        if n > CACHED_POWERS:
            return _powers(n)
        if n > self._powers.shape[1]:
            self._powers = _powers(min(max(n, 2 * self._powers.shape[1]), CACHED_POWERS))
        return self._powers[:, :n]

    def shingles(self, text: str) -> np.ndarray:
        """64-bit hashes of the token `shingle_size`-grams of the text (one shingle if it is shorter)."""
        token_hashes = self.token_hashes(text)
        n = max(1, len(token_hashes) - self.shingle_size + 1)
        hashes = np.zeros(n, dtype=np.uint64)
        for j, weight in enumerate(self._weights[:len(token_hashes)]):
            hashes += token_hashes[j:j + n] * weight  # wraps modulo 2**64, as intended
        return hashes

    def signature(self, text: str) -> np.ndarray:
        """The MinHash of the text's shingles: `num_perm` uint64 values.

        Equal to datasketch's `MinHash(num_perm, seed, hashfunc=int, scheme="affine64").update_batch(shingles)`
        without its Python loop over the shingles (tests/unit/test_dedup.py checks the equality).
        """
        a, b = self._permutations[:, :, None]  # (num_perm, 1) each
        hashes = _fmix(self.shingles(text), 64)
        signature = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate():  # restores numpy's buffer size on exit
            np.setbufsize(BUFSIZE)
            for start in range(0, len(hashes), CHUNK):
                chunk = hashes[start:start + CHUNK]
                block = self._block[:self.num_perm * len(chunk)].reshape(self.num_perm, len(chunk))
                np.add(np.multiply(a, chunk, out=block), b, out=block)  # in place: ~10% faster than temporaries
                np.minimum(signature, block.min(axis=1), out=signature)
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
