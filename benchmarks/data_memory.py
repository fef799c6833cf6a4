"""Data stage memory: does `lifecycle data` stay within a hard per-process memory cap as the corpus grows?

A synthetic English-like corpus (Zipf-distributed words from a fixed vocabulary of a few thousand words, stop
words first, 5-20 KB documents, all distinct) is written as 16 MB .jsonl.gz files (or, with --single-file, as one
plain .jsonl file, which the stage splits into sources.jsonl.unit_mb byte ranges) and run through the whole stage
(read, clean, Gopher, PII, exact + MinHash dedup, BPE tokenizer, train/val shards) at two corpus sizes, each in a
subprocess whose processes are capped with setrlimit(RLIMIT_DATA, --cap-mb). Peak RSS (VmHWM) of the stage's main
process and of its worker processes is polled from /proc every 0.2 s; the table shows whether it grows with the
corpus. Figures go to benchmarks/results/data_memory.json.

    python benchmarks/data_memory.py --mb 256 --small-mb 64 --cap-mb 400
    python benchmarks/data_memory.py --mb 256 --small-mb 64 --cap-mb 400 --set dedup=none  # no MinHash
    python benchmarks/data_memory.py --mb 256 --small-mb 64 --cap-mb 400 --single-file  # one 256 MB .jsonl

Why RLIMIT_DATA, not RLIMIT_AS: AS counts address space reserved, not used (shared libraries, glibc arenas, thread
stacks): the stage needs an AS cap of ~550-700 MB even on a 16 MB corpus. Since Linux 4.7 RLIMIT_DATA counts
private writable mappings only (heap, anonymous mmap: Python objects, numpy arrays, the tokenizer's Rust heap) and
fails an allocation past it; on 16 MB it needs ~250-350 MB. It still overstates use: numpy's OpenBLAS buffers and
scipy (via datasketch) make VmData ~230 MB at import for ~75 MB of anonymous RSS. The cap is per process and
inherited by the forked workers, so the whole tree may use up to (workers + 1) x cap.

Finding with the disk-backed global dedup (lifecycle/data/dedup_disk.py), full chain incl. MinHash, 2 workers,
400 MB RLIMIT_DATA per process, documents of ~11 KB, on 2 CPUs shared with other jobs (hence
the slow wall times):
    input                    corpus MB  units  peak main MB  peak worker MB  peak tree MB  wall s  exit
    16 MB .jsonl.gz files         64.8      4         258.8           118.7         350.9      64  0
    16 MB .jsonl.gz files        259.2     16         269.0           118.8         382.1     760  0
    one .jsonl (--single-file)    64.8      2         262.9           102.3         334.7      93  0
    one .jsonl (--single-file)   259.2      5         268.8           102.5         346.3     757  0
A corpus 4x larger than before and 0.65x the cap (0.22x the tree's combined cap) runs with the main process +10 MB:
memory no longer grows with the corpus. Before (in-memory datasketch LSH, ~6 KB per kept document) the 259 MB run
hit the cap and failed (exit 1, main at 347.8 MB). The first two rows are from before workers streamed their unit
(they then held one 16 MB file's documents, digests and signatures); the last two from after: one 259 MB file is
split into 64 MB byte ranges (sources.jsonl.unit_mb) that both workers share, and each worker holds one document at
a time: its peak (102 MB) is below the 16 MB-file runs' (119 MB) on units 4x larger. The instruction collector adds
nothing here (prose only, no Python code documents); it now streams its pairs to disk too.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STOP_WORDS = "the of and to a in that is was he for it with as his on be at by have this had not are but from".split()
FILE_BYTES = 16 * 2**20  # uncompressed text per input file (per generated piece of the --single-file corpus)
COLUMNS = ["corpus_mb", "units", "cap_mb", "peak_main_mb", "peak_worker_mb", "peak_tree_mb", "wall_s", "mb_per_s",
           "tokens", "exit"]
LETTERS = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
LETTER_P = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0,
                     1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1])


# ---- corpus -------------------------------------------------------------------------------------------------------

def vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    """Stop words first (the most frequent ranks), then distinct random words of 3-10 letters."""
    words, seen = list(STOP_WORDS), set(STOP_WORDS)
    while len(words) < size:
        word = "".join(rng.choice(LETTERS, rng.integers(3, 11), p=LETTER_P / LETTER_P.sum()))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def texts(rng: np.random.Generator, words: list[str], probs: np.ndarray) -> list[str]:
    """~FILE_BYTES of documents. Words drawn at once, separators chosen by mask."""
    n = int(FILE_BYTES / (probs @ np.array([len(w) + 1 for w in words])))
    idx = rng.choice(len(words), n, p=probs)
    plain, spaced = np.array(words, dtype=object), np.array([w + " " for w in words], dtype=object)
    u = rng.random(n)  # ~1 in 14 words ends a sentence, ~1 in 120 a paragraph
    tokens = np.where(u < 1 / 120, plain[idx] + ".\n\n", np.where(u < 1 / 14, plain[idx] + ". ", spaced[idx]))
    ends = np.cumsum(rng.integers(5_000, 20_000, n // 500) // 7)  # ~7 bytes a word: documents of 5-20 KB
    bounds = np.concatenate([[0], ends[ends < n]])
    return ["".join(tokens[a:b].tolist()).strip() for a, b in zip(bounds[:-1], bounds[1:])]


def corpus(root: Path, mb: int, seed: int, single_file: bool) -> tuple[Path, dict]:
    """The corpus of `mb` MB for `seed` and its {docs, bytes}, generated once (`.done` marks it complete): 16 MB
    .jsonl.gz files, or the same documents in one plain .jsonl."""
    out = root / f"corpus-{mb}mb-seed{seed}{'-single' if single_file else ''}"
    if (out / ".done").is_file():
        return out, json.loads((out / ".done").read_text())
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = vocabulary(rng, 4000)
    probs = 1.0 / (np.arange(len(words)) + 2.7)  # Zipf-Mandelbrot ranks
    probs /= probs.sum()
    started, info = time.perf_counter(), {"docs": 0, "bytes": 0}
    (out / "corpus.jsonl").unlink(missing_ok=True)  # a run cut short leaves a part of it
    for i in range(max(1, mb * 2**20 // FILE_BYTES)):
        docs = texts(rng, words, probs)
        with (open(out / "corpus.jsonl", "a", encoding="utf-8") if single_file
              else gzip.open(out / f"part-{i:05d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1)) as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in docs)
        info = {"docs": info["docs"] + len(docs), "bytes": info["bytes"] + sum(map(len, docs))}
    (out / ".done").write_text(json.dumps(info))
    print(f"generated {mb} MB ({info['docs']} documents) in {time.perf_counter() - started:.0f} s: {out}", flush=True)
    return out, info


# ---- memory -------------------------------------------------------------------------------------------------------

def descendants(root: int) -> list[int]:
    """root's child processes, grandchildren, ... from /proc (no psutil)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [root]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        found += frontier
    return found


def status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """Every 0.2 s: the peak RSS (VmHWM) of the main pid and of its descendants, and the tree's summed RSS."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.main_kb, self.worker_kb, self.tree_kb, self.stop = pid, 0, 0, 0, threading.Event()
        self.timeline: list[tuple[float, int, int]] = []  # (seconds, main RSS MB, tree RSS MB), once a second

    def run(self) -> None:
        started = time.perf_counter()
        while not self.stop.wait(0.2):
            workers = descendants(self.pid)
            main_kb, tree_kb = status_kb(self.pid, "VmRSS"), sum(status_kb(p, "VmRSS") for p in [self.pid, *workers])
            self.main_kb = max(self.main_kb, status_kb(self.pid, "VmHWM"))
            self.worker_kb = max([self.worker_kb, *(status_kb(p, "VmHWM") for p in workers)])
            self.tree_kb = max(self.tree_kb, tree_kb)
            t = time.perf_counter() - started
            if not self.timeline or t - self.timeline[-1][0] >= 1:
                self.timeline.append((round(t, 1), main_kb // 1024, tree_kb // 1024))


# ---- runs ---------------------------------------------------------------------------------------------------------

def run_stage(data: Path, work: Path, cap_mb: int, args: argparse.Namespace) -> dict:
    """`python -m lifecycle.data` on `data` with RLIMIT_DATA = cap_mb in it and every process it forks."""
    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (cap_mb * 2**20, cap_mb * 2**20))

    cmd = [sys.executable, "-m", "lifecycle.data", "source=[jsonl]", f"sources.jsonl.path={data}",
           f"paths.output_root={work}", f"hydra.run.dir={work}/run", "logger=none", f"workers={args.workers}",
           f"tokenizer.vocab_size={args.vocab_size}", *args.set]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "MALLOC_ARENA_MAX": "2",
           "RAYON_NUM_THREADS": str(args.workers), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    log = work / "stage.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=cap)
        sampler = Sampler(child.pid)
        sampler.start()
        try:
            rc = child.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            rc = f"timeout {child.wait()}"
    sampler.stop.set()
    sampler.join()
    wall = time.perf_counter() - started
    meta, report = (json.loads(p.read_text()) if p.is_file() else {} for p in (work / "run" / "meta.json",
                                                                               work / "run" / "report.json"))
    return {"cap_mb": cap_mb, "peak_main_mb": sampler.main_kb / 1024, "peak_worker_mb": sampler.worker_kb / 1024,
            "peak_tree_mb": sampler.tree_kb / 1024, "wall_s": wall, "exit": rc,
            "tokens": meta.get("train_tokens", 0) + meta.get("val_tokens", 0), "documents": meta.get("documents"),
            "units": report.get("sources", {}).get("jsonl", {}).get("units", 0),
            "phase_s": report.get("seconds"), "timeline": sampler.timeline,
            "log_tail": log.read_text()[-600:] if rc != 0 else ""}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=512, help="corpus size (uncompressed) of the large run")
    p.add_argument("--small-mb", type=int, default=None, help="corpus size of the small run (default mb / 4)")
    p.add_argument("--cap-mb", type=int, default=400, help="RLIMIT_DATA of every process of the stage")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-dir", type=Path, default=Path(tempfile.gettempdir()) / "lifecycle-data-memory")
    p.add_argument("--single-file", action="store_true", help="the corpus as one plain .jsonl, not 16 MB .jsonl.gz")
    p.add_argument("--set", nargs="*", default=[], help="more stage overrides; near dedup off: dedup=none")
    p.add_argument("--timeout", type=int, default=1800, help="seconds before a run counts as failed (hung)")
    args = p.parse_args()

    rows = []
    for mb in sorted({args.small_mb or max(16, args.mb // 4), args.mb}):
        data, info = corpus(args.corpus_dir, mb, args.seed, args.single_file)
        size_mb = info["bytes"] / 2**20
        with tempfile.TemporaryDirectory(prefix="data-memory-") as work:
            row = {"corpus_mb": size_mb, "corpus_docs": info["docs"], **run_stage(data, Path(work), args.cap_mb, args)}
        row["mb_per_s"] = size_mb / row["wall_s"]
        rows.append(row)
        print(f"{mb} MB: exit {row['exit']}, {row['wall_s']:.0f} s" + (f"\n{row['log_tail']}" if row["exit"] else ""),
              flush=True)

    print("  ".join(f"{k.replace('_mb', ' MB').replace('_', ' '):>14}" for k in COLUMNS))
    for r in rows:
        print("  ".join(f"{r[k]:>14.1f}" if isinstance(r[k], float) else f"{r[k]!s:>14}" for k in COLUMNS))
    out = ROOT / "benchmarks" / "results" / "data_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
