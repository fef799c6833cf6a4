"""Deduplication: precision and recall on planted near duplicates, exact variants, config errors, keep-first order,
tokens and their hashes, signatures equal to datasketch's."""
from __future__ import annotations

import pickle
import random
import re
import sysconfig
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lifecycle import CONF_DIR
from lifecycle.data import dedup
from lifecycle.data.dedup import (
    CHUNK,
    RADIX,
    TOKENS,
    ExactDuplicates,
    NearDuplicates,
    exact_key,
    normalize_for_hash,
    tokens,
    words,
)
from lifecycle.errors import ConfigError

from conftest import edit

DOCSTRING = re.compile(r'"""(.*?)"""', re.DOTALL)
N_DOCS = 300


def shingle_set(text: str) -> set[tuple[str, ...]]:
    words = normalize_for_hash(text).split()
    return set(zip(*(words[i:] for i in range(5))))


@pytest.fixture(scope="module")
def prose() -> list[str]:
    """300 distinct documents of >= 200 words: consecutive stdlib docstrings, no pair with 5-gram Jaccard >= 0.5."""
    packs, pack = [], []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        for match in DOCSTRING.finditer(path.read_text(encoding="utf-8", errors="replace")):
            if len(match.group(1).split()) >= 30:
                pack.append(match.group(1).strip())
                if sum(len(p.split()) for p in pack) >= 200:
                    packs.append("\n\n".join(pack))
                    pack = []
    docs, owners = [], defaultdict(list)  # shingle -> indices of kept docs holding it
    for text in packs:
        shingles = shingle_set(text)
        shared = Counter(j for s in shingles for j in owners[s])
        if all(n / (len(shingles) + len(docs[j][1]) - n) < 0.5 for j, n in shared.items()):
            for s in shingles:
                owners[s].append(len(docs))
            docs.append((text, shingles))
    assert len(docs) >= N_DOCS
    return [text for text, _ in docs[:N_DOCS]]


def shipped(**overrides) -> NearDuplicates:
    """conf/dedup/minhash.yaml, as `lifecycle data` instantiates it."""
    near = instantiate(OmegaConf.merge(OmegaConf.load(Path(CONF_DIR) / "dedup" / "minhash.yaml"), overrides))
    assert isinstance(near, NearDuplicates)
    return near


def planted_recall(near: NearDuplicates, prose: list[str]) -> dict[float, float]:
    """Recall on copies of every document with 1%, 2%, 3% of the words edited; asserts precision 1.0."""
    vocab, rng = sorted({w for text in prose for w in text.split()}), random.Random(0)
    assert [near.seen(f"base:{i}", near.signature(text)) for i, text in enumerate(prose)] == [None] * N_DOCS
    recall, flagged, correct = {}, 0, 0
    for rate in (0.01, 0.02, 0.03):
        hits = 0
        for i, text in enumerate(prose):
            first = near.seen(f"{rate}:{i}", near.signature(edit(text, rate, vocab, rng)))
            flagged += first is not None
            # a copy may also match an earlier copy of the same base that was itself missed
            ok = first in (f"base:{i}", f"0.01:{i}", f"0.02:{i}")
            hits += ok
            correct += ok
        recall[rate] = hits / N_DOCS
    assert correct == flagged, "a copy was matched to another base"  # precision 1.0
    return recall


@pytest.mark.parametrize("kind", [None, *TOKENS])  # None: the shipped default
def test_planted_near_duplicates_precision_and_recall(prose, kind):
    recall = planted_recall(shipped(**({"tokens": kind} if kind else {})), prose)
    assert recall[0.01] >= 0.95 and recall[0.02] >= 0.95, recall
    assert recall[0.03] >= 0.75, recall


def test_punctuation_tokens_find_more_heavily_edited_copies(prose):
    # a word edit changes the shingles that hold the word; with punctuation tokens those are a smaller share
    words_recall, punctuation_recall = (planted_recall(shipped(tokens=kind), prose) for kind in TOKENS)
    assert punctuation_recall[0.03] >= words_recall[0.03] + 0.03, (words_recall, punctuation_recall)


def test_candidates_below_threshold_are_not_duplicates(prose):
    # 64 bands of 2 rows make nearly every 10%-edited copy an LSH candidate; the Jaccard check must reject them all
    near = NearDuplicates(shingle_size=5, num_perm=128, threshold=0.7, bands=64, rows=2, seed=1, tokens="words")
    vocab, rng = sorted({w for text in prose for w in text.split()}), random.Random(1)
    for i, text in enumerate(prose[:100]):
        near.seen(f"base:{i}", near.signature(text))
    assert all(near.seen(f"copy:{i}", near.signature(edit(text, 0.10, vocab, rng))) is None
               for i, text in enumerate(prose[:100]))


def test_exact_duplicates_ignore_case_whitespace_and_unicode_form():
    text = "The quick brown fox\njumps over the lazy dog, twice."
    variants = ["THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG, TWICE.",
                "  The quick  brown fox\n\n\tjumps over the lazy dog , twice ! ",
                "The quick brown ｆｏｘ jumps over the lazy dog; twice"]  # fullwidth letters: NFKC
    exact = ExactDuplicates()
    assert exact.seen("a", text) is None
    assert [exact.seen(f"v{i}", v) for i, v in enumerate(variants)] == ["a"] * len(variants)
    assert exact.seen("b", "The quick brown fox jumps over the lazy cat, twice.") is None
    assert exact.seen_digest("w", exact_key(variants[0])) == "a"  # a key computed in a worker
    assert len(exact_key(text)) == 16 and exact_key(text) != exact_key(text + " again")


@pytest.mark.parametrize(("bands", "rows"), [(10, 8), (16, None), (None, 8)])
def test_bands_and_rows_must_cover_num_perm(bands, rows):
    with pytest.raises(ConfigError, match="bands.*rows"):
        NearDuplicates(shingle_size=5, num_perm=128, threshold=0.7, bands=bands, rows=rows, seed=1, tokens="words")


def test_null_bands_and_rows_let_datasketch_choose():
    near = NearDuplicates(shingle_size=5, num_perm=128, threshold=0.8, bands=None, rows=None, seed=1, tokens="words")
    assert near.bands >= 2 and near.bands * near.rows <= 128


def test_first_in_order_is_kept_and_runs_repeat(prose):
    vocab, rng = sorted({w for text in prose for w in text.split()}), random.Random(2)
    docs = [(f"base:{i}", text) for i, text in enumerate(prose[:60])]
    docs += [(f"copy:{i}", edit(prose[i], 0.01, vocab, rng)) for i in range(0, 60, 2)]
    random.Random(3).shuffle(docs)

    def kept(order):
        near = NearDuplicates(shingle_size=5, num_perm=128, threshold=0.7, bands=16, rows=8, seed=1, tokens="words")
        return [key for key, text in order if near.seen(key, near.signature(text)) is None]

    first = kept(docs)
    assert first == kept(docs) and len(first) == 60
    firsts = {}  # base index -> key of its first appearance
    for key, _ in docs:
        firsts.setdefault(key.split(":")[1], key)
    assert sorted(first) == sorted(firsts.values())


def test_tokens_are_words_or_words_and_punctuation_runs():
    text = "Hello, World!! x_y==(Z) café—ok ﬁne"  # ﬁ: NFKC makes it "fi"
    assert tokens(text, "words") == words(text) == ["hello", "world", "x_y", "z", "café", "ok", "fine"]
    assert tokens(text, "punctuation") == ["hello", ",", "world", "!!", "x_y", "==(", "z", ")", "café", "—", "ok",
                                           "fine"]


@pytest.mark.parametrize("kind", TOKENS)
def test_token_hashes_are_a_polynomial_of_each_token(kind):
    """The byte tables (ASCII text) split and lowercase exactly as `tokens` (any text), and hash a token the same in
    either path."""
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(128)] + list("éÉàÅ—“ﬁｆ") + list("ab C,.") * 8  # à, Å: UTF-8 bytes a0, 85
    near = NearDuplicates(shingle_size=5, num_perm=128, threshold=0.7, bands=16, rows=8, seed=1, tokens=kind)
    for text in ["", " ", "\t,", "".join(map(chr, range(128)))] + [
            "".join(rng.choice(alphabet) for _ in range(rng.randrange(60))) for _ in range(500)]:
        expected = [sum((b + 1) * RADIX**i for i, b in enumerate(token.encode())) % 2**64
                    for token in tokens(text, kind)]
        assert near.token_hashes(text).tolist() == expected, repr(text)


def test_texts_longer_than_the_cached_powers_hash_the_same(prose, monkeypatch):
    near = NearDuplicates(shingle_size=5, num_perm=128, threshold=0.7, bands=16, rows=8, seed=1, tokens="punctuation")
    expected = [near.token_hashes(text) for text in (prose[0], prose[1][:100])]
    monkeypatch.setattr(dedup, "CACHED_POWERS", 256)
    capped = NearDuplicates(shingle_size=5, num_perm=128, threshold=0.7, bands=16, rows=8, seed=1, tokens="punctuation")
    for text, hashes in zip((prose[0], prose[1][:100]), expected):  # past the cap, then within it
        assert np.array_equal(capped.token_hashes(text), hashes)
    assert capped._powers.shape[1] <= 256  # the longer text's powers were not kept


def test_an_unknown_tokens_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="dedup tokens must be one of words, punctuation; got 'letters'"):
        NearDuplicates(shingle_size=5, num_perm=128, threshold=0.7, bands=16, rows=8, seed=1, tokens="letters")


@pytest.mark.parametrize("kind", TOKENS)
def test_signatures_equal_datasketch_affine64(prose, kind):
    """Block by block through one reused scratch buffer, the signature is datasketch's MinHash of the shingles."""
    near = NearDuplicates(shingle_size=5, num_perm=128, threshold=0.7, bands=16, rows=8, seed=1, tokens=kind)
    long = "\n\n".join(prose[:20])
    assert len(near.shingles(long)) > 2 * CHUNK  # several blocks
    for text in (long, prose[0], "", "one two"):  # shorter after longer: nothing of an earlier block is left
        reference = MinHash(num_perm=128, seed=1, hashfunc=int, scheme="affine64")  # datasketch's own update
        reference.update_batch(near.shingles(text))
        assert np.array_equal(near.signature(text), reference.hashvalues), text[:40]
    assert np.getbufsize() == 8192  # numpy's default, restored after each signature


def test_signature_is_pure_and_pickles_without_the_index(prose):
    near = NearDuplicates(shingle_size=5, num_perm=128, threshold=0.7, bands=16, rows=8, seed=1, tokens="words")
    signature = near.signature(prose[0])
    assert signature.dtype == np.uint64 and signature.shape == (128,)
    reference = MinHash(num_perm=128, seed=1, hashfunc=int, scheme="affine64")  # datasketch's own update
    reference.update_batch(near.shingles(prose[0]))
    assert np.array_equal(reference.hashvalues, signature)
    assert near.seen("a", signature) is None and near.seen("b", near.signature(prose[0])) == "a"
    assert len(pickle.dumps(near)) < 10_000  # what a worker gets: settings, not the scratch buffer or caches
    copy = pickle.loads(pickle.dumps(near))
    assert np.array_equal(copy.signature(prose[0]), signature)
    assert copy.seen("c", signature) is None  # a fresh, empty index
    other_seed = NearDuplicates(shingle_size=5, num_perm=128, threshold=0.7, bands=16, rows=8, seed=2,
                                 tokens="words")
    assert not np.array_equal(other_seed.signature(prose[0]), signature)
