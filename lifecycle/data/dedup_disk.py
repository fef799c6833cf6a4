"""Exact and near dedup on disk (datatrove-style): bucket files, sort, union-find; memory bounded per bucket.

`duplicate_flags` decides, before any document is written, which documents of the processed units the in-memory
`ExactDuplicates` / `NearDuplicates.seen` pass would drop, without an index that grows with the corpus:

1. one pass over the units' `.exact.npy` / `.sig.npy`, UNIT_ROWS rows at a time: records (digest, doc) and, per LSH
   band, (band hash, doc) are appended to bucket files chosen by the key's top bits; signatures go to one on-disk array;
2. per exact bucket: sort, and every document after the first of a run of equal 16-byte digests is an exact duplicate;
3. per band bucket (exact duplicates left out): sort, pair each run's first document with the others, keep the pairs
   that match (estimated Jaccard >= threshold and one band equal, as `seen` checks), union them (union-find on disk);
4. per component (bucketed by root): the first document is kept and each later one is dropped if it matches a kept
   one, in document order; so, as in `seen`, a document close only to a dropped one is kept, not chained away.

Held in memory, whatever the corpus or unit size: UNIT_ROWS rows of a unit's arrays, FLUSH_ROWS buffered records,
one bucket file (about RECORDS_PER_BUCKET records of 16-24 B, sorted), PAIRS signature pairs and CHUNK-row blocks.
Per document, on disk under work_dir: its signature (num_perm x 8 B, read row by row), a union-find parent (8 B) and
its flag (1 B); those two are memory-mapped, so touched pages count in RSS, but as file pages the kernel can write
back and drop (outside RLIMIT_DATA). A single component (a near-duplicate cluster) is held whole in one bucket.
It can differ from `seen` only where two matching documents end up in different components: every band they share
has a first document that fails to match one of them, and nothing else links them (rare at 16 x 8 bands); then the
later one is kept (and documents whose fate depended on it may change). Pure union-find (datatrove) would also drop
chains: B matches A and C matches B but not A drops C there; here, as in `seen`, C is kept.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from datasketch.minhash import _fmix
from numpy.lib.format import open_memmap

from lifecycle.data.dedup import NearDuplicates
from lifecycle.errors import DataError

EXACT, NEAR = 1, 2            # flag values: why a document is dropped (0: kept)
RECORDS_PER_BUCKET = 1 << 19  # buckets=None: ~0.5M band records (8 MB) per bucket file, the most loaded at once
FLUSH_ROWS = 1 << 16          # records buffered across units before they are appended to the bucket files
CHUNK = 1 << 16               # rows per block when scanning the per-document arrays
PAIRS = 1 << 11               # signature pairs compared at once: 2 x 2048 x 1 KB
UNIT_ROWS = 1 << 12           # rows of a unit's arrays read at once (memory-mapped): 4 MB of signatures at num_perm 128


def duplicate_flags(units: list[Path], work_dir: Path, *, exact: bool, near: NearDuplicates | None,
                    buckets: int | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """Per document (units in order, documents in unit order): 0 keep, EXACT or NEAR drop; and the counts of each.

    The flags are `work_dir/duplicate_flags.npy` (uint8, memory-mapped); every other file is removed on return.
    """
    sizes = [np.load(u.with_suffix(".exact.npy"), mmap_mode="r").shape[0] for u in units]
    total, counts = sum(sizes), {"exact": 0, "near": 0}
    if total == 0:
        return np.zeros(0, np.uint8), counts
    work_dir.mkdir(parents=True, exist_ok=True)
    flags = open_memmap(work_dir / "duplicate_flags.npy", mode="w+", dtype=np.uint8, shape=(total,))  # zeros
    tmp = work_dir / "dedup_tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        count = buckets or -(-total * (near.bands if near else 1) // RECORDS_PER_BUCKET)
        digests = BucketFiles(tmp / "exact", count, width=3) if exact else None
        bands = BucketFiles(tmp / "bands", count, width=2) if near is not None else None
        sig = SignatureFile(tmp / "signatures.u64", near.num_perm) if near is not None else None
        _scatter(units, sizes, digests, bands, sig, near)
        if digests is not None:
            counts["exact"] = _flag_exact(digests, flags)
        if bands is not None:
            parent = _memmap(tmp / "parent.i64", np.int64, (total,))
            for start in range(0, total, CHUNK):
                parent[start:start + CHUNK] = np.arange(start, min(start + CHUNK, total))
            if _join_matches(bands, sig, near, flags, parent):
                groups = BucketFiles(tmp / "groups", count, width=2)
                counts["near"] = _flag_near(_components(parent, groups), sig, near, flags)
        flags.flush()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return flags, counts


class BucketFiles:
    """`count` append-only files of uint64 records `width` wide; a record's file is chosen by its key's top bits."""

    def __init__(self, folder: Path, count: int, width: int) -> None:
        folder.mkdir()
        self.paths = [folder / f"{i:05d}.u64" for i in range(count)]
        self.width = width
        self._keys: list[np.ndarray] = []
        self._records: list[np.ndarray] = []
        self._rows = 0

    def add(self, keys: np.ndarray, records: np.ndarray) -> None:
        """Buffer (n, width) records placed by their uniformly distributed uint64 keys (n,)."""
        self._keys.append(keys)
        self._records.append(records)
        self._rows += len(keys)
        if self._rows >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        bucket = (np.concatenate(self._keys) >> np.uint64(32)) * np.uint64(len(self.paths)) >> np.uint64(32)
        order = np.argsort(bucket, kind="stable")
        records, bounds = np.concatenate(self._records)[order], np.bincount(bucket, minlength=len(self.paths))
        bounds = np.concatenate([[0], np.cumsum(bounds)])
        for b in np.flatnonzero(np.diff(bounds)):
            with open(self.paths[b], "ab") as f:
                records[bounds[b]:bounds[b + 1]].tofile(f)
        self._keys, self._records, self._rows = [], [], 0

    def __iter__(self):
        """Each bucket's records as an (n, width) uint64 array, one bucket in memory at a time."""
        self.flush()
        for path in self.paths:
            if path.is_file():
                yield np.fromfile(path, dtype=np.uint64).reshape(-1, self.width)


class SignatureFile:
    """(documents, num_perm) uint64 MinHash signatures on disk, read back a row at a time.

    Not memory-mapped: the kernel maps pages around each faulted one (fault-around), so random rows of a mapping
    would put most of the file into the process's RSS.
    """

    def __init__(self, path: Path, width: int) -> None:
        self.path, self.width = path, width
        path.touch()

    def append(self, signatures: np.ndarray) -> None:
        with open(self.path, "ab") as f:
            signatures.astype(np.uint64, copy=False).tofile(f)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), width): the signatures of the documents idx."""
        unique, inverse = np.unique(idx, return_inverse=True)
        out = np.empty((len(unique), self.width), dtype=np.uint64)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for row, i in zip(out, unique.tolist()):
                os.preadv(fd, [row], i * self.width * 8)
        finally:
            os.close(fd)
        return out[inverse]


def _memmap(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A zero-filled (sparse) file mapped as a plain ndarray: fancy indexing without memmap's subclass overhead."""
    return np.memmap(path, dtype=dtype, mode="w+", shape=shape).view(np.ndarray)


def _scatter(units: list[Path], sizes: list[int], digests: BucketFiles | None, bands: BucketFiles | None,
             sig: SignatureFile | None, near: NearDuplicates | None) -> None:
    """Step 1: unit by unit, UNIT_ROWS rows at a time (memory-mapped, so a unit of any size fits), digests and band
    hashes to their buckets and signatures to the global array."""
    offset = 0
    for unit, n in zip(units, sizes):
        exact = np.load(unit.with_suffix(".exact.npy"), mmap_mode="r") if digests is not None and n else None
        sig_path = unit.with_suffix(".sig.npy")
        signatures = np.load(sig_path, mmap_mode="r") if bands is not None and n and sig_path.is_file() else None
        if signatures is not None and signatures.shape != (n, near.num_perm):
            raise DataError(f"{sig_path} holds MinHash signatures of shape {signatures.shape}, expected "
                            f"{(n, near.num_perm)}: the unit was processed with other dedup settings; delete it")
        for start in range(0, n, UNIT_ROWS):
            idx = np.arange(offset + start, offset + min(start + UNIT_ROWS, n), dtype=np.uint64)
            if exact is not None:
                pair = np.ascontiguousarray(exact[start:start + UNIT_ROWS]).view("<u8")  # (rows, 2): 16 bytes
                digests.add(pair[:, 0], np.column_stack([pair, idx]))
            if bands is not None and signatures is None:
                sig.append(np.zeros((len(idx), near.num_perm), dtype=np.uint64))  # rows stay aligned; never a candidate
            elif bands is not None:
                block = np.asarray(signatures[start:start + UNIT_ROWS])  # (rows, num_perm)
                sig.append(block)
                hashes = _band_hashes(block, near).ravel()  # (rows * bands,), document-major
                bands.add(hashes, np.column_stack([hashes, np.repeat(idx, near.bands)]))
        offset += n


def _band_hashes(signatures: np.ndarray, near: NearDuplicates) -> np.ndarray:
    """(n, bands) 64-bit hashes of each band's `rows` values, seeded by the band so bands never share a run."""
    banded = signatures[:, :near.bands * near.rows].reshape(len(signatures), near.bands, near.rows)
    hashes = np.repeat(_fmix(np.arange(1, near.bands + 1, dtype=np.uint64), 64)[None], len(signatures), axis=0)
    for r in range(near.rows):
        hashes = _fmix(hashes ^ banded[:, :, r], 64)
    return hashes


def _runs(keys: tuple[np.ndarray, ...], idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort records by keys then document; (order, is_start): is_start marks each run of equal keys' first row."""
    order = np.lexsort((idx, *reversed(keys)))
    start = np.ones(len(order), dtype=bool)
    start[1:] = np.logical_or.reduce([k[order][1:] != k[order][:-1] for k in keys])
    return order, start


def _flag_exact(digests: BucketFiles, flags: np.ndarray) -> int:
    """Step 2: all but the first document of each run of equal full digests (no 8-byte prefix collisions)."""
    dropped = 0
    for records in digests:
        order, start = _runs((records[:, 0], records[:, 1]), records[:, 2])
        duplicates = records[order[~start], 2].astype(np.int64)
        flags[duplicates] = EXACT
        dropped += len(duplicates)
    return dropped


def _join_matches(bands: BucketFiles, sig: SignatureFile, near: NearDuplicates, flags: np.ndarray,
                  parent: np.ndarray) -> bool:
    """Step 3: union each band run's first document with the other members it matches; True if any were joined."""
    joined = False
    for records in bands:
        records = records[flags[records[:, 1].astype(np.int64)] == 0]  # exact duplicates never enter near dedup
        idx = records[:, 1].astype(np.int64)
        order, start = _runs((records[:, 0],), idx)
        idx = idx[order]
        first = idx[np.maximum.accumulate(np.where(start, np.arange(len(idx)), 0))]
        a, b = first[~start], idx[~start]
        match = _matches(sig, a, b, near)
        _union(parent, a[match], b[match])
        joined |= bool(match.any())
    return joined


def _matches(sig: SignatureFile, a: np.ndarray, b: np.ndarray, near: NearDuplicates) -> np.ndarray:
    """Pairwise: estimated Jaccard >= threshold and at least one equal band (what makes `seen` return a key)."""
    width, out = near.bands * near.rows, np.zeros(len(a), dtype=bool)
    for s in range(0, len(a), PAIRS):
        rows = sig.rows(np.concatenate([a[s:s + PAIRS], b[s:s + PAIRS]]))[:, :width]
        equal = rows[:len(rows) // 2] == rows[len(rows) // 2:]  # (pairs, bands * rows)
        similar = np.count_nonzero(equal, axis=1) / width >= near.threshold
        out[s:s + PAIRS] = similar & equal.reshape(len(equal), near.bands, near.rows).all(axis=2).any(axis=1)
    return out


def _find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Roots of x (pointer jumping), written back as their parents (path compression)."""
    root = parent[x]
    while True:
        up = parent[root]
        if np.array_equal(up, root):
            break
        root = up
    parent[x] = root
    return root


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the components of each pair; the larger root hangs under the smaller, so a root is its component's min."""
    while len(a):
        a, b = _find(parent, a), _find(parent, b)
        differ = a != b
        a, b = a[differ], b[differ]
        np.minimum.at(parent, np.maximum(a, b), np.minimum(a, b))  # min: a root hooked twice takes the smaller


def _components(parent: np.ndarray, groups: BucketFiles) -> BucketFiles:
    """Bucket (root, member) of every document that is not its component's first, by a hash of the root."""
    for start in range(0, len(parent), CHUNK):
        nodes = np.arange(start, min(start + CHUNK, len(parent)))
        nodes = nodes[parent[nodes] != nodes]
        roots = _find(parent, nodes).astype(np.uint64)
        nodes = nodes.astype(np.uint64)
        groups.add(_fmix(roots, 64), np.column_stack([roots, nodes]))
    return groups


def _flag_near(groups: BucketFiles, sig: SignatureFile, near: NearDuplicates, flags: np.ndarray) -> int:
    """Step 4: in document order, drop each member that matches a kept member of its component (the root is kept)."""
    dropped = 0
    for records in groups:
        order, start = _runs((records[:, 0],), records[:, 1])
        roots, idx = records[order, 0].astype(np.int64), records[order, 1].astype(np.int64)
        match = _matches(sig, roots, idx, near)  # most members match their root: vectorised
        run = np.cumsum(start) - 1
        bounds = np.append(np.flatnonzero(start), len(idx))
        for r in np.unique(run[~match]):  # components with a member unlike the root: the few chains, in order
            kept = []
            for i in range(bounds[r], bounds[r + 1]):
                if not match[i]:
                    match[i] = bool(kept) and _matches(sig, np.array(kept), np.full(len(kept), idx[i]), near).any()
                    if not match[i]:
                        kept.append(idx[i])
        flags[idx[match]] = NEAR
        dropped += int(match.sum())
    return dropped
