"""A worker streams its unit: bounded memory on a file far larger than its cap, the same unit files, no leftovers."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from lifecycle.data import process
from lifecycle.data.dedup import NearDuplicates, exact_key
from lifecycle.data.dedup_disk import duplicate_flags
from lifecycle.data.process import Job, Worker, read_unit
from lifecycle.data.sources import JsonLines

from conftest import ROOT, prose

# Imports first, then RLIMIT_DATA = what the process has mapped by then + HEADROOM, then one Worker.run.
CAPPED_RUN = """
import json, resource, sys
from pathlib import Path
from lifecycle.data.process import Job, Worker
from lifecycle.data.sources import JsonLines

path, out, headroom = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
worker = Worker({"big": JsonLines("big", path, "text", "prose", None)}, [], None)
status = Path("/proc/self/status").read_text()
cap = int(status.split("VmData:")[1].split()[0]) * 1024 + headroom
resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
stats = worker.run(Job("big", path, "fingerprint", out))
print(json.dumps({"docs_out": stats["docs_out"], "bytes_out": stats["bytes_out"]}))
"""
HEADROOM = 32 * 2**20


def test_a_unit_many_times_the_memory_cap_streams_through(tmp_path):
    """140 MB of text in one .jsonl.gz (one unit, it cannot be split) under 32 MB above the process's baseline: the
    old worker, which kept the unit's documents in a list, fails here with MemoryError."""
    words = " ".join(f"w{i % 997}" for i in range(20_000))  # ~100 KB a document, compresses ~30x
    path = tmp_path / "big.jsonl.gz"
    with gzip.open(path, "wt", compresslevel=1) as f:
        for i in range(1500):
            f.write(json.dumps({"text": f"doc {i} {words}"}) + "\n")
    out = subprocess.run([sys.executable, "-c", CAPPED_RUN, str(path), str(tmp_path / "cache" / "unit"),
                          str(HEADROOM)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads(out.stdout)
    assert stats["docs_out"] == 1500 and stats["bytes_out"] > 4 * HEADROOM
    assert sum(1 for _ in read_unit(tmp_path / "cache" / "unit")) == 1500


def test_streamed_unit_files_hold_every_kept_document_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(process, "BUFFER_BYTES", 100)  # many small appends to the raw digest/signature files
    texts = [prose(i, n_words=60) for i in range(50)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    near = NearDuplicates(shingle_size=5, num_perm=128, threshold=0.7, bands=16, rows=8, seed=1,
                          tokens="words")
    worker = Worker({"j": JsonLines("j", str(tmp_path / "a.jsonl"), "text", "prose", None)}, [], near)
    out = tmp_path / "cache" / "unit"
    assert worker.run(Job("j", str(tmp_path / "a.jsonl"), "fp", out))["docs_out"] == 50
    assert [d.text for d in read_unit(out)] == texts
    exact, sig = (np.load(out.with_suffix(s), mmap_mode="r") for s in (".exact.npy", ".sig.npy"))
    assert exact.dtype == np.uint8 and sig.dtype == np.uint64
    assert np.array_equal(exact, np.stack([np.frombuffer(exact_key(t), np.uint8) for t in texts]))
    assert np.array_equal(sig, np.stack([near.signature(t) for t in texts]))
    flags, counts = duplicate_flags([out], tmp_path / "work", exact=True, near=near)
    assert len(flags) == 50 and counts == {"exact": 0, "near": 0}
    assert sorted(p.name for p in out.parent.iterdir()) == [f"unit{s}" for s in (".exact.npy", ".json", ".jsonl.gz",
                                                                                  ".sig.npy")]


def test_a_unit_that_fails_midway_leaves_nothing_behind(tmp_path):
    class Failing(JsonLines):
        def read(self, key, skips):
            yield from list(super().read(key, skips))[:3]
            raise OSError("disk went away")

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": prose(i)}) + "\n" for i in range(10)))
    worker = Worker({"j": Failing("j", str(tmp_path / "a.jsonl"), "text", "prose", None)}, [], None)
    with pytest.raises(OSError, match="disk went away"):
        worker.run(Job("j", str(tmp_path / "a.jsonl"), "fp", tmp_path / "cache" / "unit"))
    assert list((tmp_path / "cache").iterdir()) == []  # no temp files, no half unit: a re-run starts it over
