"""lifecycle.monitor.drift: scores from a real usage database against a profile, each checked by hand."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from lifecycle.data.profile import LENGTH_BINS
from lifecycle.errors import DataError
from lifecycle.monitor import drift
from lifecycle.serve.usage import UsageMeter, UsageRecord

VOCAB = 50


def profile(tmp_path):
    freqs = np.zeros(VOCAB, dtype=int)
    freqs[:10] = 100  # the corpus uses tokens 0-9 only
    hist = [0] * (len(LENGTH_BINS) - 1)
    hist[2] = 10  # every document has 16-31 tokens
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"token_frequencies": freqs.tolist(), "length_bins": LENGTH_BINS,
                                "doc_tokens_hist": hist}))
    return path


def cfg(tmp_path, **over):
    return OmegaConf.create({"profile": str(profile(tmp_path)), "model": None, "base": None, "ppl_max_requests": 8,
                             **over})


def log(meter, ids, ts, finish="stop", empty=False, lp=-1.0, rid=None):
    meter.record(UsageRecord("k", "m", "rest", "/v1/completions", 200, len(ids), 4, 10.0, finish_reason=finish,
                             mean_logprob=lp, stats={"prompt_token_ids": ids, "output_token_ids": [1],
                                                     "prompt_chars": 9, "output_chars": 0 if empty else 3,
                                                     "empty_output": empty}, ts=ts, request_id=rid))


@pytest.fixture()
def meter(tmp_path):
    m = UsageMeter(f"sqlite:///{tmp_path / 'usage.db'}")
    yield m
    m.close()


def test_in_domain_traffic_scores_low_and_out_of_domain_high(tmp_path, meter):
    for i in range(10):
        log(meter, list(range(10)) * 2, ts=100 + i)          # the corpus's own tokens and lengths
        log(meter, list(range(30, 50)) * 3, ts=200 + i)      # unseen tokens, 60 tokens long
    meter.flush()
    home = drift.measure(cfg(tmp_path), meter.url, 100, 150)
    away = drift.measure(cfg(tmp_path), meter.url, 200, 250)
    assert home["drift/requests"] == away["drift/requests"] == 10
    assert home["drift/token_js"] == pytest.approx(0, abs=1e-6) and away["drift/token_js"] == pytest.approx(1)
    assert home["drift/length_psi"] == pytest.approx(0, abs=1e-9)
    freqs = np.asarray(json.loads(profile(tmp_path).read_text())["token_frequencies"], float)
    assert drift.token_js_baseline(20, freqs) > drift.token_js_baseline(2000, freqs) > 0  # smaller: farther
    # all mass moved from bin 2 to bin 3: (1 - f) ln(1 / f) + (f - 1) ln(f / 1) with the floor f
    f = drift.PSI_FLOOR
    assert away["drift/length_psi"] == pytest.approx(2 * (1 - f) * math.log(1 / f))


def test_output_side_shares_and_feedback(tmp_path, meter):
    log(meter, [1, 2], ts=10, finish="length", lp=-2.0, rid="cmpl-a")
    log(meter, [1, 2], ts=11, empty=True, lp=-4.0, rid="cmpl-b")
    log(meter, [1, 2], ts=12, rid="cmpl-c")
    log(meter, [1, 2], ts=13, rid="cmpl-d")
    meter.record(UsageRecord("k", "-", "rest", "/v1/models", 200, ts=14))  # not a generation: not counted
    meter.record_feedback("cmpl-a", "k", -1, "thumbs", True, None)
    meter.record_feedback("cmpl-c", "k", 5, "stars", False, None)
    m = drift.measure(cfg(tmp_path), meter.url, 0, 100)
    assert m["quality/truncated_share"] == m["quality/empty_share"] == m["quality/negative_feedback_share"] == 0.25
    assert m["quality/mean_logprob"] == pytest.approx((-2 - 4 - 1 - 1) / 4)


def test_an_empty_window_a_missing_profile_and_a_missing_database_say_so(tmp_path, meter):
    log(meter, [1], ts=10)
    meter.flush()
    with pytest.raises(drift.NoTraffic, match="no traffic in window"):
        drift.measure(cfg(tmp_path), meter.url, 50, 60)
    with pytest.raises(DataError, match="no corpus profile"):
        drift.measure(cfg(tmp_path, profile=str(tmp_path / "nope.json")), meter.url, 0, 60)
    with pytest.raises(DataError, match="no usage recorded"):
        drift.measure(cfg(tmp_path), f"sqlite:///{tmp_path / 'other.db'}", 0, 60)


def test_the_plot_draws_the_recorded_scores(tmp_path):
    history = tmp_path / "metrics.jsonl"
    history.write_text("".join(json.dumps({"ts": 60.0 * i, "drift/token_js": 0.1 * i}) + "\n" for i in range(4)))
    png = drift.plot(history, tmp_path / "drift.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    history.write_text(json.dumps({"ts": 1, "serve/requests": 3}) + "\n")
    with pytest.raises(DataError, match="no drift scores"):
        drift.plot(history, tmp_path / "none.png")
