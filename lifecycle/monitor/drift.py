"""Drift and answer quality of live traffic: the request log in a time window against the data stage's profile.

Input side (what users ask): `drift/token_js`, the Jensen-Shannon distance (base 2, in [0, 1]) between the token
frequencies of the window's prompts and the training corpus, beside `drift/token_js_baseline`, what a sample of the
corpus itself of the same token count scores (JS of a small sample is large by sample size alone, so compare the
two, or rules across windows of different size mislead); `drift/length_psi`, the population stability index
of prompt lengths over the profile's length bins; `drift/ppl`, the production model's perplexity on the prompts
(out-of-domain traffic raises it; only where `drift.model` is set). Output side (how it answers):
`quality/mean_logprob` (mean over requests of the generated tokens' mean log-prob), `quality/empty_share`,
`quality/truncated_share` (finish_reason "length"), `quality/negative_feedback_share` (share of the window's
requests rated negatively). `drift/requests` is the sample size.

PSI rather than KS: the profile stores binned histograms, and PSI compares exactly those bins; a KS test would have
to invent positions inside each bin, and its p-value says "different" for any gap once samples are large. Caveat:
the profile bins whole documents, so short prompts of the corpus's own domain also show a length PSI; the token and
perplexity scores are the ones that separate domains.

A window without traffic raises NoTraffic (never zeros). History plots: `plot(history, png)`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, inspect, select
from sqlalchemy.engine import make_url

from lifecycle.errors import DataError
from lifecycle.serve.usage import NoUsage, feedback_table, requests_table

PSI_FLOOR = 1e-4  # an empty bin would make PSI infinite; this is the usual floor


class NoTraffic(DataError):
    """No generation request in the window: nothing to measure (the monitor shows "no traffic")."""


def measure(cfg_drift, db_url: str, since: float, until: float) -> dict[str, float]:
    """Drift and quality scores of the requests in [since, until); NoTraffic if there are none."""
    profile = read_profile(cfg_drift.profile)
    rows, negative = read_window(db_url, since, until)
    if not rows:
        raise NoTraffic(f"no traffic in window [{since:.0f}, {until:.0f}) in {db_url}: no generation request was "
                        "logged then (is the server metering into this database?)")
    prompts = [r["stats"]["prompt_token_ids"] for r in rows]
    freqs = np.asarray(profile["token_frequencies"], dtype=np.float64)
    out = {"drift/requests": float(len(rows)),
           "drift/token_js": token_js(prompts, freqs),
           "drift/token_js_baseline": token_js_baseline(sum(map(len, prompts)), freqs),
           "drift/length_psi": psi([r["prompt_tokens"] for r in rows], profile["length_bins"],
                                   profile["doc_tokens_hist"])}
    if cfg_drift.model:
        out["drift/ppl"] = perplexity(cfg_drift.model, cfg_drift.base, prompts[-cfg_drift.ppl_max_requests:])
    logprobs = [r["mean_logprob"] for r in rows if r["mean_logprob"] is not None]
    if logprobs:  # absent (not NaN) where no row carries one, e.g. gRPC-only traffic
        out["quality/mean_logprob"] = float(np.mean(logprobs))
    out["quality/empty_share"] = sum(bool(r["stats"].get("empty_output")) for r in rows) / len(rows)
    out["quality/truncated_share"] = sum(r["finish_reason"] == "length" for r in rows) / len(rows)
    out["quality/negative_feedback_share"] = sum(r["request_id"] in negative for r in rows) / len(rows)
    return out


def read_profile(path) -> dict:
    """The data stage's profile.json, or a DataError saying how to make one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"drift.profile={path}: no corpus profile there; run `lifecycle data` (it writes "
                        "profile.json in its run dir) or point drift.profile at the production model's data run")
    return json.loads(path.read_text())


def read_window(db_url: str, since: float, until: float) -> tuple[list[dict], set[str]]:
    """(generation rows with statistics in the window, request ids rated negatively), read-only."""
    engine, tables = open_usage(db_url)
    try:
        t = requests_table
        query = select(t.c.prompt_tokens, t.c.finish_reason, t.c.mean_logprob, t.c.stats, t.c.request_id) \
            .where(t.c.ts >= since, t.c.ts < until, t.c.status == 200).order_by(t.c.ts)
        with engine.connect() as conn:
            # Only generations carry statistics; a JSON column stores None as JSON null, so filter here, not in SQL.
            rows = [dict(r._mapping) for r in conn.execute(query) if r.stats]
            negative = set()
            if feedback_table.name in tables:
                f = feedback_table
                negative = {r[0] for r in conn.execute(select(f.c.request_id).where(f.c.negative.is_(True)))}
        return rows, negative
    finally:
        engine.dispose()


def open_usage(db_url: str):
    """(engine, table names) of an existing usage database; NoUsage where there is none (never created here)."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).is_file():
        raise NoUsage(db_url)  # checked before create_engine, which would create an empty file
    engine = create_engine(db_url)
    tables = inspect(engine).get_table_names()
    if requests_table.name not in tables:
        engine.dispose()
        raise NoUsage(db_url)
    return engine, tables


def token_js(prompts: list[list[int]], reference: np.ndarray) -> float:
    """Jensen-Shannon distance between the prompts' token frequencies and the reference counts."""
    from scipy.spatial.distance import jensenshannon

    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in prompts]) if prompts else np.zeros(0, np.int64)
    live = np.bincount(ids[(ids >= 0) & (ids < reference.size)], minlength=reference.size).astype(np.float64)
    if not live.sum():
        return math.nan
    return float(jensenshannon(live, reference, base=2))


def token_js_baseline(n_tokens: int, reference: np.ndarray, draws: int = 5) -> float:
    """The token_js an n-token sample of the corpus itself scores: the part of token_js due to sample size alone
    (a small window is far from any large distribution). Thresholds compare token_js with it."""
    rng = np.random.default_rng(0)
    p = reference / reference.sum()
    return float(np.mean([token_js([np.repeat(np.arange(p.size), rng.multinomial(n_tokens, p))], reference)
                          for _ in range(draws)]))


def psi(lengths: list[int], bins: list[int], reference_hist: list[int]) -> float:
    """Population stability index sum((a - e) * ln(a / e)) over the bins (our five lines; scipy has none)."""
    live = np.bincount(np.searchsorted(bins, lengths, side="right") - 1, minlength=len(reference_hist))
    a = np.maximum(live[:len(reference_hist)] / max(1, len(lengths)), PSI_FLOOR)
    e = np.maximum(np.asarray(reference_hist, dtype=np.float64) / max(1, sum(reference_hist)), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def perplexity(model_dir: str, base: str | None, prompts: list[list[int]]) -> float:
    """exp(mean next-token NLL) of the model (a model dir, or an adapter dir on `base`) over the prompts' tokens."""
    import torch

    model = load_scorer(model_dir, base)
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in (p for p in prompts if len(p) > 1):
            x = torch.tensor([ids[:model.config.max_position_embeddings]])
            logits = model(x).logits[0, :-1]  # (L - 1, V): position i predicts token i + 1
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += x.shape[1] - 1
    return math.exp(nll / count) if count else math.nan


def load_scorer(model_dir: str, base: str | None):
    """The production model for scoring: a model directory, or an adapter on its base (given or recorded)."""
    from lifecycle.models.adapters import is_adapter_dir, load_adapter, read_config
    from lifecycle.models.load import load_model

    if not is_adapter_dir(model_dir):
        return load_model(model_dir)[0]
    base = base or read_config(Path(model_dir)).get("base_model_name_or_path")
    if not base:
        raise DataError(f"drift.model={model_dir} is an adapter without a recorded base: set drift.base")
    return load_adapter(load_model(base)[0], model_dir).eval()


def plot(history: Path, png: Path, keys: tuple[str, ...] = ("drift/token_js", "drift/length_psi", "drift/ppl")) -> Path:
    """A PNG of drift scores over time from a metrics.jsonl history (one JSON object a line with `ts`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [json.loads(line) for line in Path(history).read_text().splitlines() if line.strip()]
    points = [p for p in points if "ts" in p]
    shown = [k for k in keys if any(isinstance(p.get(k), (int, float)) for p in points)]
    if not shown:
        raise DataError(f"{history}: no drift scores ({', '.join(keys)}) recorded yet")
    fig, axes = plt.subplots(len(shown), 1, figsize=(7, 2.2 * len(shown)), sharex=True, squeeze=False)
    t0 = min(p["ts"] for p in points)
    for ax, key in zip(axes[:, 0], shown):
        xs = [(p["ts"] - t0) / 60 for p in points if isinstance(p.get(key), (int, float))]
        ax.plot(xs, [p[key] for p in points if isinstance(p.get(key), (int, float))], marker="o")
        ax.set_ylabel(key.split("/", 1)[1])
    axes[-1, 0].set_xlabel("minutes since the first check")
    fig.suptitle("drift of live traffic against the training corpus")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
