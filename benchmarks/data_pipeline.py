"""Data pipeline throughput and dedup quality: ours (filters + exact + MinHash LSH) against datasketch and datatrove.

One corpus of stdlib source chunks (code, docstrings stripped) and packed docstrings (prose), cleared of natural
duplicates, gets planted copies of known originals: exact (case and whitespace changed) and near (1%, 2%, 3% of the
words substituted, deleted or inserted). In alternating rounds in one run, each peer deduplicates it with the same
shingle size and the same LSH bands x rows (conf/dedup/minhash.yaml unless overridden; a shingle is made of each
peer's own tokens):
  ours        lifecycle's steps from conf/step/*.yaml (in conf/data.yaml's order; skipped if not importable), then
              ExactDuplicates and NearDuplicates (tokens: words, or words and punctuation runs, as configured):
              steps, exact keys and signatures in --workers forked processes, the LSH in the main one;
  ours-dedup  the same without the steps; the -1p rows run the same in one process;
  datasketch  the textbook way: lowercase split, MinHash.generator over shingle sets, MinHashLSH query, insert;
  datatrove   its 4-stage MinHash pipeline (LocalPipelineExecutor, --workers workers), run by --datatrove-python
              (a separate venv: datatrove is no project dependency) on the corpus written as JSONL;
  datatrove-chain  the like-for-like peer of `ours`: its own cleaning and filters first, as a datatrove user
              configures them to match conf/step (FTFYFormatter, GopherRepetitionFilter and GopherQualityFilter on
              prose only, as our gopher step's `kinds`, PIIFormatter), written out, then the same 4 MinHash stages.
Reported per peer: median wall seconds, MB/s, MB/s per core (cores = its processes, at most the CPUs), precision and
recall on the planted pairs (a pair counts once either copy is removed; any other removal is a false positive).
Goal: ours >= 1x the fastest peer's MB/s per core with recall within 1 point, like for like: the full chain
(`ours`, `ours-1p`) against `datatrove-chain`, deduplication alone (`ours-dedup*`) against datasketch and datatrove.
Figures go to benchmarks/results/data_pipeline.json.

    make bench-peers      # datatrove's venv, .benchvenv (0.10.1 also needs extras; xxhash 4 rejects its str input)
    python benchmarks/data_pipeline.py --mb 8 --rounds 2
    python benchmarks/data_pipeline.py --mb 8 --rounds 1 --peers ours-dedup-1p datasketch   # quick: dedup speed
"""
from __future__ import annotations

# Only the standard library at module level: datatrove's workers re-import this file inside .benchvenv.
import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCSTRING = re.compile(r'"""(.*?)"""', re.DOTALL)
WORD = re.compile(r"(\S+)(\s*)")
LEVELS = ("exact", 0.01, 0.02, 0.03)
PEERS = ("ours", "ours-1p", "ours-dedup", "ours-dedup-1p", "datasketch", "datatrove", "datatrove-chain")
CHUNK_CHARS = 3000  # code documents: consecutive blocks of a file up to this size


# ---- corpus -------------------------------------------------------------------------------------------------------

def stdlib_documents(limit: int) -> list[tuple[str, str]]:
    """(kind, text) pairs up to `limit` bytes: code chunks without docstrings, and docstrings packed to >= 200 words."""
    docs, size, pack = [], 0, []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in DOCSTRING.finditer(text):
            pack.append(match.group(1).strip())
            if sum(len(p.split()) for p in pack) >= 200:
                docs.append(("prose", "\n\n".join(pack)))
                size += len(docs[-1][1].encode())
                pack = []
        chunk = ""
        for block in [*DOCSTRING.sub('""""""', text).split("\n\n"), None]:
            if len(chunk) > 200 and (block is None or len(chunk) + len(block) > CHUNK_CHARS):
                docs.append(("code", chunk))
                size += len(chunk.encode())
                chunk = ""
            chunk += f"{block}\n\n" if block is not None else ""
        if size >= limit:
            break
    return docs


def distinct(docs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop exact duplicates and documents with estimated 5-gram Jaccard >= 0.5 to an earlier one (stdlib has some)."""
    from lifecycle.data.dedup import ExactDuplicates, NearDuplicates
    exact, near = ExactDuplicates(), NearDuplicates(5, 128, 0.5, bands=32, rows=4, seed=7, tokens="words")
    return [(kind, text) for i, (kind, text) in enumerate(docs)
            if exact.seen(str(i), text) is None and near.seen(str(i), near.signature(text)) is None]


def edit(text: str, rate: float, vocab: list[str], rng: random.Random) -> str:
    """`rate` of the words substituted, deleted or inserted, the whitespace between words kept."""
    words = WORD.findall(text)
    for _ in range(max(1, round(rate * len(words)))):
        i, op = rng.randrange(len(words)), rng.randrange(3)
        if op == 0:
            words[i] = (rng.choice(vocab), words[i][1])
        elif op == 1 and len(words) > 1:
            del words[i]
        else:
            words.insert(i, (rng.choice(vocab), " "))
    return "".join(w + s for w, s in words)


def restyle(text: str, rng: random.Random) -> str:
    """The text in another case, spaces doubled, blank lines added: an exact duplicate once normalised."""
    text = text.upper() if rng.random() < 0.5 else text.swapcase()
    return "\n" + text.replace(" ", "  ") + "\n\n"


def build_corpus(mb: float, planted: float, seed: int) -> tuple[list[dict], list[tuple[str, str, str]], dict]:
    """Documents (id, text, kind) in order and the planted (original id, copy id, level) pairs."""
    rng = random.Random(seed)
    limit = int(mb * 1e6 / (1 + planted))  # the copies add about `planted` of the bytes again
    raw = stdlib_documents(int(limit * 1.2))
    bases, size = [], 0
    for kind, text in distinct(raw):
        size += len(text.encode())
        if size > limit:
            break
        bases.append((kind, text))
    vocab = sorted({w for _, text in bases[:500] for w in text.split()})
    docs = [{"id": f"doc{i:06d}", "text": text, "kind": kind} for i, (kind, text) in enumerate(bases)]
    originals = rng.sample(range(len(docs)), int(planted * len(docs)))
    pairs, inserts = [], []
    for n, i in enumerate(originals):
        level = LEVELS[n % len(LEVELS)]
        text = docs[i]["text"]
        copy = restyle(text, rng) if level == "exact" else edit(text, level, vocab, rng)
        copy_id = f"copy{n:06d}"
        pairs.append((docs[i]["id"], copy_id, str(level)))
        inserts.append((rng.randrange(i + 1, len(docs) + 1), {"id": copy_id, "text": copy, "kind": docs[i]["kind"]}))
    for position, doc in sorted(inserts, key=lambda x: -x[0]):  # from the back, so earlier positions stay valid
        docs.insert(position, doc)
    stats = {"documents": len(docs), "bases_read": len(raw), "bases_used": len(bases), "planted_pairs": len(pairs),
             "bytes": sum(len(d["text"].encode()) for d in docs)}
    return docs, pairs, stats


# ---- peers --------------------------------------------------------------------------------------------------------

_WORK: tuple = ()  # (documents, steps, near) in each worker, inherited through fork


def _init_worker(documents: list, steps: list, near) -> None:
    global _WORK
    _WORK = documents, steps, near


def _process(i: int) -> tuple[bytes | None, object]:
    """In a worker: document i through the steps, then its exact key and signature; (None, None) if dropped."""
    from lifecycle.data.dedup import exact_key
    from lifecycle.data.document import Drop
    doc, steps, near = _WORK[0][i], _WORK[1], _WORK[2]
    for step in steps:
        doc = step(doc)
        if isinstance(doc, Drop):
            return None, None
    return exact_key(doc.text), near.signature(doc.text)


def load_steps() -> tuple[list, str]:
    """The steps of conf/data.yaml's `step` list, instantiated; an empty list and a note if they cannot be."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    names = next(d["step"] for d in OmegaConf.load(ROOT / "conf" / "data.yaml").defaults if "step" in d)
    try:
        return [instantiate(OmegaConf.load(ROOT / "conf" / "step" / f"{n}.yaml")) for n in names], ",".join(names)
    except Exception as err:  # another engineer's modules may not exist yet
        print(f"note: filter steps skipped ({type(err).__name__}: {err})")
        return [], "none"


def _results(documents: list, steps: list, near, workers: int):
    """(exact key, signature) per document, in order: in this process (workers=0) or in a pool of workers."""
    from multiprocessing import get_context
    if workers == 0:
        _init_worker(documents, steps, near)
        yield from map(_process, range(len(documents)))
        return
    # fork: the workers inherit the documents (as the stage's workers read their own files); only results travel
    with get_context("fork").Pool(workers, initializer=_init_worker, initargs=(documents, steps, near)) as pool:
        yield from pool.imap(_process, range(len(documents)), chunksize=64)


def run_ours(docs: list[dict], steps: list, dedup_cfg, workers: int) -> dict:
    from hydra.utils import instantiate

    from lifecycle.data.dedup import ExactDuplicates
    from lifecycle.data.document import Document
    started = time.perf_counter()
    near, exact = instantiate(dedup_cfg), ExactDuplicates()
    documents = [Document(d["id"], d["text"], "stdlib", d["kind"]) for d in docs]
    removed, dropped = set(), set()
    for doc, (digest, signature) in zip(docs, _results(documents, steps, near, workers)):
        if digest is None:
            dropped.add(doc["id"])
        elif exact.seen_digest(doc["id"], digest) is not None or near.seen(doc["id"], signature) is not None:
            removed.add(doc["id"])
    return {"seconds": time.perf_counter() - started, "cores": min(workers + 1, os.cpu_count()) if workers else 1,
            "removed": removed, "dropped": dropped}


def run_datasketch(docs: list[dict], dedup_cfg) -> dict:
    from datasketch import MinHash, MinHashLSH
    started = time.perf_counter()
    k = dedup_cfg.shingle_size
    lsh = MinHashLSH(threshold=dedup_cfg.threshold, num_perm=dedup_cfg.num_perm,
                     params=(dedup_cfg.bands, dedup_cfg.rows) if dedup_cfg.bands else None)

    def shingles(text):
        words = text.lower().split()
        return {" ".join(words[i:i + k]).encode() for i in range(max(1, len(words) - k + 1))}

    removed = set()
    minhashes = MinHash.generator((shingles(d["text"]) for d in docs), num_perm=dedup_cfg.num_perm,
                                  seed=dedup_cfg.seed)
    for doc, minhash in zip(docs, minhashes):
        if lsh.query(minhash):
            removed.add(doc["id"])
        else:
            lsh.insert(doc["id"], minhash)
    return {"seconds": time.perf_counter() - started, "cores": 1, "removed": removed, "dropped": set()}


def run_datatrove(docs: list[dict], dedup_cfg, workers: int, python: Path, chain: bool = False) -> dict:
    """datatrove in its own venv: the corpus as one JSONL file per worker, its timing and removals read back."""
    with tempfile.TemporaryDirectory(prefix="datatrove-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        per_file = -(-len(docs) // workers)
        for w in range(workers):
            with open(corpus / f"part{w}.jsonl", "w", encoding="utf-8") as f:
                for d in docs[w * per_file:(w + 1) * per_file]:
                    f.write(json.dumps({"id": d["id"], "text": d["text"], "kind": d["kind"]}) + "\n")
        cmd = [str(python), __file__, "--datatrove-run", tmp, "--workers", str(workers), "--shingle",
               str(dedup_cfg.shingle_size), "--bands", str(dedup_cfg.bands), "--rows", str(dedup_cfg.rows),
               "--seed", str(dedup_cfg.seed), *(["--datatrove-chain"] if chain else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:
            raise RuntimeError(f"datatrove failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        result = json.loads((Path(tmp) / "result.json").read_text())
    return {"seconds": result["seconds"], "cores": min(workers, os.cpu_count()), "removed": set(result["removed"]),
            "dropped": set(result["dropped"])}


def datatrove_main(tmp: str, workers: int, shingle: int, bands: int, rows: int, seed: int, chain: bool) -> None:
    """Inside .benchvenv: (with `chain`, datatrove's cleaning and filters, then) its 4 MinHash stages over
    tmp/corpus; writes tmp/result.json with the wall seconds, the ids removed as duplicates and dropped by filters."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.filters.base_filter import BaseFilter
    from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers.jsonl import JsonlWriter

    class ProseOnly(BaseFilter):
        """Our gopher step's `kinds: [prose, ...]`: the wrapped filter judges prose; code passes to the next step."""
        name = "prose only"

        def __init__(self, inner, exclusion_writer):
            super().__init__(exclusion_writer)
            self.inner = inner

        def filter(self, doc):
            return doc.metadata.get("kind") != "prose" or self.inner.filter(doc)

    out = Path(tmp)
    config = MinhashConfig(n_grams=shingle, num_buckets=bands, hashes_per_bucket=rows, seed=seed)
    tasks = len(list((out / "corpus").glob("*.jsonl")))
    source = out / ("filtered" if chain else "corpus")

    def reader():
        return JsonlReader(str(source), compression=None)

    def dropped_writer(name):
        return JsonlWriter(str(out / "dropped" / name), compression=None)

    stages = [
        ([reader(), MinhashDedupSignature(str(out / "signatures"), config=config)], tasks),
        ([MinhashDedupBuckets(str(out / "signatures"), str(out / "buckets"), config=config)], bands),
        ([MinhashDedupCluster(str(out / "buckets"), str(out / "remove_ids"), config=config)], 1),
        ([reader(), MinhashDedupFilter(str(out / "remove_ids"),
                                       exclusion_writer=JsonlWriter(str(out / "removed"), compression=None)),
          JsonlWriter(str(out / "kept"), compression=None)], tasks),
    ]
    if chain:
        stages.insert(0, ([JsonlReader(str(out / "corpus"), compression=None), FTFYFormatter(),
                           ProseOnly(GopherRepetitionFilter(), dropped_writer("repetition")),
                           ProseOnly(GopherQualityFilter(), dropped_writer("quality")), PIIFormatter(),
                           JsonlWriter(str(source), compression=None)], tasks))
    started = time.perf_counter()
    for n, (pipeline, stage_tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline, tasks=stage_tasks, workers=min(workers, stage_tasks),
                              logging_dir=str(out / f"logs{n}")).run()
    seconds = time.perf_counter() - started

    def ids(folder):
        return [json.loads(line)["id"] for f in sorted((out / folder).rglob("*.jsonl")) for line in open(f)]
    (out / "result.json").write_text(json.dumps({"seconds": seconds, "removed": ids("removed"),
                                                 "dropped": ids("dropped") if chain else []}))


# ---- scoring and report -------------------------------------------------------------------------------------------

def score(removed: set[str], dropped: set[str], pairs: list[tuple[str, str, str]]) -> dict:
    """Precision and recall on the pairs whose members both survived the steps; recall per planted level too."""
    scored = [(a, b, level) for a, b, level in pairs if a not in dropped and b not in dropped]
    removed = removed - {doc for a, b, _ in pairs if a in dropped or b in dropped for doc in (a, b)}
    found = [(a in removed or b in removed, level) for a, b, level in scored]
    tp = sum(hit for hit, _ in found)
    levels = {str(level): [hit for hit, lv in found if lv == str(level)] for level in LEVELS}
    return {"precision": tp / len(removed) if removed else 1.0, "recall": tp / max(1, len(scored)),
            "false_positives": len(removed) - tp, "pairs_scored": len(scored), "dropped_by_steps": len(dropped),
            "recall_by_level": {lv: round(sum(h) / len(h), 4) if h else None for lv, h in levels.items()}}


def signature_speed(docs: list[dict], dedup_cfg) -> dict:
    """MB/s of one process computing signatures of ~1 MB: datasketch per-shingle update, update_batch, ours (all over
    the shingles of ours's `tokens`)."""
    from datasketch import MinHash
    from hydra.utils import instantiate

    from lifecycle.data.dedup import tokens
    texts, size = [], 0
    while size < 1e6 and len(texts) < len(docs):
        texts.append(docs[len(texts)]["text"])
        size += len(texts[-1].encode())
    near, k, num_perm = instantiate(dedup_cfg), dedup_cfg.shingle_size, dedup_cfg.num_perm

    def grams(text):
        words = tokens(text, dedup_cfg.tokens)
        return [" ".join(words[i:i + k]).encode() for i in range(max(1, len(words) - k + 1))]

    def per_shingle(text):
        minhash = MinHash(num_perm=num_perm)
        for gram in grams(text):
            minhash.update(gram)

    def batch(text):
        MinHash(num_perm=num_perm).update_batch(grams(text))

    speeds = {}
    for name, fn in (("datasketch_update", per_shingle), ("datasketch_update_batch", batch), ("ours", near.signature)):
        started = time.perf_counter()
        for text in texts:
            fn(text)
        speeds[name] = round(size / 1e6 / (time.perf_counter() - started), 3)
    return speeds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=8.0, help="corpus size, planted copies included")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of ours and datasketch")
    parser.add_argument("--datatrove-rounds", type=int, default=1, help="rounds of datatrove (slow); 0 = skip")
    parser.add_argument("--planted", type=float, default=0.2, help="share of originals that get one planted copy")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dedup", nargs="*", default=[], help="conf/dedup/minhash.yaml overrides: threshold=0.8")
    parser.add_argument("--peers", nargs="*", default=PEERS, choices=PEERS, help="the peers to run (default: all)")
    parser.add_argument("--datatrove-python", type=Path, default=ROOT / ".benchvenv/bin/python")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "data_pipeline.json")
    parser.add_argument("--datatrove-run", help=argparse.SUPPRESS)  # internal: the datatrove side, in its venv
    parser.add_argument("--shingle", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bands", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--datatrove-chain", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def alternate(peers: dict, rounds: dict[str, int]) -> dict[str, list[dict]]:
    """Round r runs every peer that has more than r rounds, in the order given."""
    runs = {name: [] for name in peers}
    for r in range(max(rounds.values())):
        for name, run in peers.items():
            if r < rounds[name]:
                runs[name].append(run())
                print(f"round {r + 1} {name}: {runs[name][-1]['seconds']:.2f} s")
    return {name: results for name, results in runs.items() if results}


def summarize(runs: dict[str, list[dict]], pairs: list, mb: float) -> dict:
    """Median seconds and throughput per peer; precision and recall of its last round (the removals repeat)."""
    report = {}
    for name, results in runs.items():
        seconds, last = statistics.median(r["seconds"] for r in results), results[-1]
        report[name] = {"seconds": round(seconds, 3), "rounds": [round(r["seconds"], 3) for r in results],
                        "cores": last["cores"], "mb_per_s": round(mb / seconds, 3),
                        "mb_per_s_per_core": round(mb / seconds / last["cores"], 3),
                        **score(last["removed"], last["dropped"], pairs)}
    return report


def goal(report: dict) -> dict:
    """Like for like: the full chain against datatrove's chain, deduplication alone against the dedup-only peers;
    per core against the fastest such peer, recall against the best such peer's."""
    out = {}
    for ours, peer_names in ((("ours", "ours-1p"), ("datatrove-chain",)),
                             (("ours-dedup", "ours-dedup-1p"), ("datasketch", "datatrove"))):
        peers = {name: report[name] for name in peer_names if name in report}
        if not peers:
            continue
        fastest = max(peers, key=lambda name: peers[name]["mb_per_s_per_core"])
        best_recall = max(r["recall"] for r in peers.values())
        for name in ours:
            if name in report:
                r, best = report[name], peers[fastest]["mb_per_s_per_core"]
                out[name] = {"against": fastest, "per_core_vs_fastest": round(r["mb_per_s_per_core"] / best, 3),
                             "recall_points_vs_best_peer": round(100 * (r["recall"] - best_recall), 2)}
    return out


def main() -> None:
    args = parse_args()
    if args.datatrove_run:
        return datatrove_main(args.datatrove_run, args.workers, args.shingle, args.bands, args.rows, args.seed,
                              args.datatrove_chain)
    sys.path.insert(0, str(ROOT))
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    dedup_cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "dedup" / "minhash.yaml"),
                                OmegaConf.from_dotlist(args.dedup))
    near = instantiate(dedup_cfg)  # resolves bands x rows when null, so every peer uses the same LSH
    dedup_cfg.bands, dedup_cfg.rows = near.bands, near.rows

    started = time.perf_counter()
    docs, pairs, corpus = build_corpus(args.mb, args.planted, args.seed)
    corpus["build_seconds"] = round(time.perf_counter() - started, 2)
    print(f"corpus: {corpus}")
    print(f"dedup: {OmegaConf.to_container(dedup_cfg)}")
    steps, step_names = load_steps()
    peers = {"ours": lambda: run_ours(docs, steps, dedup_cfg, args.workers),
             "ours-1p": lambda: run_ours(docs, steps, dedup_cfg, 0),
             "ours-dedup": lambda: run_ours(docs, [], dedup_cfg, args.workers),
             "ours-dedup-1p": lambda: run_ours(docs, [], dedup_cfg, 0),
             "datasketch": lambda: run_datasketch(docs, dedup_cfg),
             "datatrove": lambda: run_datatrove(docs, dedup_cfg, args.workers, args.datatrove_python),
             "datatrove-chain": lambda: run_datatrove(docs, dedup_cfg, args.workers, args.datatrove_python, True)}
    rounds = {name: args.rounds for name in peers} | {"datatrove": args.datatrove_rounds,
                                                      "datatrove-chain": args.datatrove_rounds if steps else 0}
    rounds |= {name: 0 for name in peers if name not in args.peers}
    if not steps:
        rounds["ours-dedup"] = rounds["ours-dedup-1p"] = 0
    if args.datatrove_rounds and not args.datatrove_python.exists():
        print(f"note: datatrove skipped: no {args.datatrove_python} (see the module docstring)")
        rounds["datatrove"] = rounds["datatrove-chain"] = 0

    report = summarize(alternate(peers, rounds), pairs, corpus["bytes"] / 1e6)
    speeds = signature_speed(docs, dedup_cfg)
    print_table(report, corpus["bytes"] / 1e6)
    print(f"signatures alone, 1 process, MB/s: {speeds}")
    print(f"goal (>= 1x, >= -1 point): {goal(report)}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "config": {"mb": args.mb, "rounds": rounds, "planted": args.planted, "workers": args.workers,
                   "seed": args.seed, "steps": step_names, "dedup": OmegaConf.to_container(dedup_cfg),
                   "cpus": os.cpu_count()},
        "corpus": corpus, "peers": report, "signature_mb_per_s": speeds, "goal": goal(report)}, indent=2) + "\n")
    print(f"wrote {args.output}")


def print_table(report: dict, mb: float) -> None:
    levels = [str(lv) for lv in LEVELS]
    print(f"\n{mb:.2f} MB; recall by planted level: {', '.join(levels)}")
    print(f"{'peer':<16} {'cores':>5} {'seconds':>8} {'MB/s':>7} {'MB/s/core':>9} {'precision':>9} {'recall':>7}"
          "  by level")
    for name, r in report.items():
        by_level = " ".join(f"{r['recall_by_level'][lv]:.3f}" if r["recall_by_level"][lv] is not None else "-"
                            for lv in levels)
        print(f"{name:<16} {r['cores']:>5} {r['seconds']:>8.2f} {r['mb_per_s']:>7.2f} {r['mb_per_s_per_core']:>9.2f} "
              f"{r['precision']:>9.4f} {r['recall']:>7.4f}  {by_level}")


if __name__ == "__main__":
    main()
