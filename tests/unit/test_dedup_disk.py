"""Disk-backed dedup: planted duplicates across units, equality with the in-memory pass, chains, bounded memory."""
from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from lifecycle.data import dedup_disk
from lifecycle.data.dedup import ExactDuplicates, NearDuplicates, exact_key
from lifecycle.data.dedup_disk import EXACT, NEAR, duplicate_flags
from lifecycle.data.document import Document
from lifecycle.data.process import UnitWriter, read_unit

from conftest import edit


def minhash() -> NearDuplicates:
    return NearDuplicates(shingle_size=5, num_perm=128, threshold=0.7, bands=16, rows=8, seed=1,
                          tokens="punctuation")  # conf/dedup/minhash


def vocabulary(size: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return sorted({"".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(size)})


def variant(text: str, rng: random.Random) -> str:
    """The same normalised text: case, whitespace or punctuation changed."""
    return rng.choice([str.upper, lambda t: "  " + t.replace(" ", " \n\t ", 7) + " ",
                       lambda t: t.replace(" ", ", ", 5) + "!"])(text)


def planted(bases: int, seed: int, words: int = 300) -> tuple[list[str], list[int]]:
    """Distinct random-word documents, exact variants and 1-2% edited copies, shuffled; and each one's base."""
    vocab, rng = vocabulary(4000, seed), random.Random(seed)
    texts = [" ".join(rng.choices(vocab, k=words)) for _ in range(bases)]
    group = list(range(bases))
    for b in rng.sample(range(bases), bases // 3):
        texts.append(variant(texts[b], rng))
        group.append(b)
    for b in rng.sample(range(bases), bases * 2 // 3):
        texts.append(edit(texts[b], rng.choice([0.01, 0.02]), vocab, rng))
        group.append(b)
    for i in rng.sample(range(bases, len(texts)), bases // 10):  # exact variants of copies too
        texts.append(variant(texts[i], rng))
        group.append(group[i])
    order = list(range(len(texts)))
    rng.shuffle(order)
    return [texts[i] for i in order], [group[i] for i in order]


def write_units(folder: Path, texts: list[str], per_unit: int, near: NearDuplicates | None) -> list[Path]:
    """Units laid out as process.py writes them: .jsonl.gz, .exact.npy and (with near) .sig.npy."""
    units = []
    for u, start in enumerate(range(0, len(texts), per_unit)):
        chunk = texts[start:start + per_unit]
        units.append(folder / f"unit{u:04d}")
        with UnitWriter(units[-1]) as writer:
            for i, t in enumerate(chunk):
                writer.add(Document(id=f"d{start + i}", text=t, source="s", kind="prose"),
                           np.frombuffer(exact_key(t), dtype=np.uint8), near.signature(t) if near else None)
    return units


def in_memory(units: list[Path], near: NearDuplicates) -> np.ndarray:
    """What select.py's in-memory pass drops, per document: 0, EXACT or NEAR."""
    exact, out = ExactDuplicates(), []
    for unit in units:
        docs = read_unit(unit)
        digests, signatures = np.load(unit.with_suffix(".exact.npy")), np.load(unit.with_suffix(".sig.npy"))
        for i, doc in enumerate(docs):
            if exact.seen_digest(doc.id, digests[i].tobytes()) is not None:
                out.append(EXACT)
            elif near.seen(doc.id, signatures[i]) is not None:
                out.append(NEAR)
            else:
                out.append(0)
    return np.array(out, dtype=np.uint8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[Path], list[str], list[int]]:
    texts, groups = planted(bases=600, seed=0)
    return write_units(tmp_path_factory.mktemp("units"), texts, 97, minhash()), texts, groups


def test_planted_duplicates_are_found_and_the_first_of_each_group_is_kept(corpus, tmp_path):
    units, texts, groups = corpus
    flags, counts = duplicate_flags(units, tmp_path, exact=True, near=minhash(), buckets=8)
    first, seen_keys, want_exact, want_near = {}, set(), set(), set()
    for i, (text, g) in enumerate(zip(texts, groups)):
        key = exact_key(text)
        if key in seen_keys:
            want_exact.add(i)
        elif g in first:
            want_near.add(i)
        seen_keys.add(key)
        first.setdefault(g, i)
    got_exact, got_near = set(np.flatnonzero(flags == EXACT)), set(np.flatnonzero(flags == NEAR))
    assert got_exact == want_exact and len(want_exact) > 250
    assert got_near <= want_near  # precision 1.0: no distinct document and no group's first is dropped
    assert len(got_near) >= 0.95 * len(want_near) and len(want_near) > 300
    assert counts == {"exact": len(got_exact), "near": len(got_near)}
    assert not flags[sorted(first.values())].any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["duplicate_flags.npy"]  # temporary files removed
    assert np.array_equal(np.load(tmp_path / "duplicate_flags.npy"), flags)


def test_flags_equal_the_in_memory_pass(corpus, tmp_path):
    units, _, _ = corpus
    flags, _ = duplicate_flags(units, tmp_path, exact=True, near=minhash())
    assert np.array_equal(flags, in_memory(units, minhash()))


def test_same_flags_for_any_bucket_count_and_run(corpus, tmp_path):
    units, _, _ = corpus
    runs = [np.array(duplicate_flags(units, tmp_path / str(b), exact=True, near=minhash(), buckets=b)[0])
            for b in (1, 5, 64, 64)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])
    exact_only = duplicate_flags(units, tmp_path / "exact", exact=True, near=None)[0]
    assert np.array_equal(exact_only, np.where(runs[0] == EXACT, EXACT, 0))


def write_arrays(folder: Path, digests: np.ndarray, signatures: np.ndarray | None) -> Path:
    """A unit of only the arrays duplicate_flags reads (its documents are not needed)."""
    folder.mkdir(exist_ok=True)
    np.save(folder / "u.exact.npy", digests)
    if signatures is not None:
        np.save(folder / "u.sig.npy", signatures)
    return folder / "u"


def test_a_document_close_only_to_a_dropped_one_is_kept_as_in_memory(tmp_path):
    # B = A with bands 0-3 changed (Jaccard 0.75), C = B with bands 4-7 changed: C ~ B (0.75), C !~ A (0.5) though
    # A and C share bands 8-15. Union-find alone would drop C through B; the in-memory pass, which compares with
    # kept documents only, keeps it, and so must this.
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, 128, dtype=np.uint64)
    b, c = a.copy(), a.copy()
    b[:32] = c[:32] = rng.integers(0, 2**63, 32, dtype=np.uint64)
    c[32:64] = rng.integers(0, 2**63, 32, dtype=np.uint64)
    signatures = np.stack([a, b, c])
    digests = rng.integers(0, 256, (3, 16), dtype=np.uint8)
    flags, counts = duplicate_flags([write_arrays(tmp_path / "u", digests, signatures)], tmp_path,
                                    exact=True, near=minhash())
    near = minhash()
    assert [near.seen(k, s) for k, s in zip("abc", signatures)] == [None, "a", None]
    assert flags.tolist() == [0, NEAR, 0] and counts == {"exact": 0, "near": 1}


def test_exact_compares_all_16_digest_bytes_and_units_without_signatures(tmp_path):
    digests = np.zeros((4, 16), dtype=np.uint8)
    digests[1, 15] = 1  # same first 8 bytes as document 0: the same bucket key, another text
    digests[3] = digests[1]
    units = [write_arrays(tmp_path / "u0", digests[:2], None), write_arrays(tmp_path / "u1", digests[2:], None)]
    flags, counts = duplicate_flags(units, tmp_path / "work", exact=True, near=minhash())
    assert flags.tolist() == [0, 0, EXACT, EXACT] and counts == {"exact": 2, "near": 0}


def test_memory_does_not_grow_with_the_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(dedup_disk, "FLUSH_ROWS", 4096)  # the buffer is bounded; at this size it is not the peak
    near, peaks = minhash(), []
    for n in (2000, 8000):
        texts, _ = planted(bases=n * 3 // 5, seed=n, words=60)
        units = write_units(tmp_path / f"units{n}", texts[:n], 400, near)
        tracemalloc.start()
        flags, counts = duplicate_flags(units, tmp_path / f"work{n}", exact=True, near=near, buckets=n // 50)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert len(flags) == n and counts["exact"] > 0 and counts["near"] > 0
    assert peaks[1] < 1.5 * peaks[0], peaks
