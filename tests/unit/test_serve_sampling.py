"""Sampled tokens (lifecycle.serve.sampler, native_step.c's lc_sample): counter-based draws that follow softmax(logits /
temperature) under top-k and top-p, the same rule in C and in torch, refused when nothing can be drawn; sampled rows
run several steps per C call (ServedModel.decode_run) drawing exactly the tokens single steps draw, and a seeded
request's output does not change with run-ahead on or off."""
from __future__ import annotations

import asyncio
import copy
import math

import pytest
import torch
from serve_models import PROMPTS, ask, collect, llama_dir, run, serving, tokenizer, tokens  # noqa: F401
from test_serve_fastpath import random_model
from test_serve_native import _prefilled

from lifecycle.serve import native
from lifecycle.serve.protocol import Sampling
from lifecycle.serve.sampler import NOTHING_TO_DRAW, Sampler, _draw_torch, job_seed, uniform
from lifecycle.serve.served import ServedModel

C = Sampler("auto")
TORCH = Sampler(False)


@pytest.fixture(scope="module", params=["C", "torch"])
def sampler(request) -> Sampler:
    return C if request.param == "C" else TORCH


def test_the_uniform_numbers_are_the_same_in_c_and_python():
    lib = native.library()
    for seed in (0, 1, 7, 2**63 + 5, 2**64 - 1):
        for counter in (0, 1, 2, 1000, 2**40):
            u = uniform(seed, counter)
            assert u == lib.lc_uniform(seed, counter) and 0 <= u < 1
    draws = [uniform(3, n) for n in range(20000)]
    assert abs(sum(draws) / len(draws) - 0.5) < 0.01
    assert len(set(draws)) == len(draws)


def test_c_is_in_use_here():
    assert C.native and not TORCH.native


def _frequencies(sampler: Sampler, logits: torch.Tensor, sampling: Sampling, n: int = 12000) -> torch.Tensor:
    counts = torch.zeros(logits.shape[0])
    for i in range(n):
        counts[sampler.draw(logits, sampling, 11, i)] += 1
    return counts / n


def test_draws_follow_the_tempered_softmax(sampler):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])
    for temperature in (1.0, 0.5, 2.0):
        want = torch.softmax(logits / temperature, -1)
        got = _frequencies(sampler, logits, Sampling(temperature=temperature))
        assert (got - want).abs().max() < 0.015, (temperature, got, want)


def test_top_k_and_top_p_keep_what_they_should(sampler):
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    # top_p 0.7: 0.5 (nothing before it) and 0.3 (0.5 before it) stay; 0.15 has 0.8 before it
    got = _frequencies(sampler, logits, Sampling(temperature=1.0, top_p=0.7))
    assert got[0] == 0 and got[2] == 0 and abs(got[1] - 0.5 / 0.8) < 0.015
    got = _frequencies(sampler, logits, Sampling(temperature=1.0, top_k=2))
    assert got[0] == 0 and got[2] == 0 and abs(got[3] - 0.3 / 0.8) < 0.015
    got = _frequencies(sampler, logits, Sampling(temperature=1.0, top_k=3, top_p=0.5), n=3000)
    assert got[1] == 1.0  # top-k first: 0.3 has 0.5 / 0.95 > 0.5 of the kept mass before it
    # equal weights: ties go by index; the token whose mass before it equals top_p exactly is kept
    got = _frequencies(sampler, torch.zeros(8), Sampling(temperature=1.0, top_p=0.5), n=4000)
    assert (got[:5] > 0.15).all() and (got[5:] == 0).all()
    # ties at the k-th largest logit all stay
    got = _frequencies(sampler, torch.tensor([1.0, 3.0, 1.0, 0.0]), Sampling(temperature=1.0, top_k=2), n=4000)
    assert got[0] > 0 and got[2] > 0 and got[3] == 0


def test_c_and_torch_draw_the_same_tokens():
    """The same rule in both: on a 8,192-token vocabulary, for each setting, every draw agrees (they may differ only
    where float rounding puts the uniform number on a boundary between two tokens)."""
    torch.manual_seed(0)
    logits = torch.randn(8192) * 3
    for sampling in (Sampling(temperature=1.0), Sampling(temperature=0.7, top_p=0.9),
                     Sampling(temperature=1.3, top_k=40), Sampling(temperature=1.0, top_k=100, top_p=0.5),
                     Sampling(temperature=1.0, top_p=0.999)):
        c = [C.draw(logits, sampling, 5, n) for n in range(300)]
        assert c == [_draw_torch(logits, sampling, 5, n) for n in range(300)], sampling
        assert len(set(c)) >= 4  # really sampled


def test_a_draw_depends_only_on_seed_and_counter(sampler):
    logits = torch.randn(1000)
    sampling = Sampling(temperature=1.0)
    first = [sampler.draw(logits, sampling, 42, n) for n in range(50)]
    assert [sampler.draw(logits, sampling, 42, n) for n in reversed(range(50))] == first[::-1]
    assert [sampler.draw(logits, sampling, 43, n) for n in range(50)] != first


@pytest.mark.parametrize("poison", ["nan", "inf", "all -inf"])
def test_nothing_to_draw_is_an_error(sampler, poison):
    logits = torch.zeros(16)
    if poison == "nan":
        logits[3] = math.nan
    elif poison == "inf":
        logits[5] = math.inf
    else:
        logits[:] = -math.inf
    with pytest.raises(ValueError, match="no token can be drawn"):
        sampler.draw(logits, Sampling(temperature=1.0), 1, 0)


def test_seeds_of_any_size_and_sign():
    assert job_seed(-1) == 2**64 - 1 and job_seed(5) == 5 and job_seed(2**70 + 3) == 3
    assert 0 <= job_seed(None) < 2**64
    assert C.draw(torch.randn(50), Sampling(temperature=1.0), job_seed(-1), 0) in range(50)


def _single_steps(served: ServedModel, batch, ids: list[int], draws: list[tuple], n: int) -> list[list[int]]:
    out = [[] for _ in ids]
    with torch.no_grad():
        for step in range(n):
            logits = served.decode("base", ids, batch)
            ids = []
            for r, (temperature, top_k, top_p, seed, counter) in enumerate(draws):
                sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
                token = (int(logits[r].argmax()) if temperature == 0
                         else served.sampler.draw(logits[r], sampling, seed, counter + step))
                ids.append(token)
                out[r].append(token)
    return out


@pytest.mark.parametrize("family", ["llama", "llama_int8"])
def test_sampled_runs_equal_single_steps(family, tokenizer):
    """Rows greedy and sampled side by side, in runs of 5, 1 and 6 steps: the tokens single steps draw, with each
    row's counters going on across runs."""
    served = ServedModel(random_model(family), tokenizer, "base", native=True)
    assert served.runs_ahead("base")
    batch = _prefilled(random_model(family), 4, 5)
    reference = copy.deepcopy(batch)
    draws = [(1.0, 0, 1.0, 3, 1), (0.0, 0, 1.0, 0, 1), (0.8, 20, 0.9, 2**64 - 9, 1), (1.5, 0, 0.5, 4, 1)]
    ids = [2, 3, 4, 5]
    got = [[] for _ in ids]
    done = 0
    with torch.no_grad():
        for k in (5, 1, 6):
            run_, _ = served.decode_run("base", ids, batch, k, [(*d[:4], d[4] + done) for d in draws])
            for row, part in zip(got, run_):
                row += part
            ids, done = [part[-1] for part in run_], done + k
    want = _single_steps(served, reference, [2, 3, 4, 5], draws, 12)
    assert got == want
    assert len(set(got[0])) > 3  # sampled rows really sample


def test_a_run_marks_a_row_with_nothing_to_draw(tokenizer):
    model = random_model("llama")
    served = ServedModel(model, tokenizer, "base", native=True)
    batch = _prefilled(random_model("llama"), 2, 4)
    with torch.no_grad():
        model.lm_head.weight[7].fill_(math.nan)  # every step's logit 7: NaN
    served = ServedModel(model, tokenizer, "base", native=True)
    out, _ = served.decode_run("base", [2, 3], batch, 3, [(1.0, 0, 1.0, 1, 0), (0.0, 0, 1.0, 0, 0)])
    assert out[0] == [-1, -1, -1]
    assert all(t >= 0 for t in out[1])  # a greedy row's argmax takes NaN as numpy does, not an error


def test_engine_sampled_output_is_the_same_with_and_without_run_ahead(llama_dir):
    sampling = {"temperature": 1.0, "top_k": 50, "top_p": 0.9}

    async def outputs(run_ahead_ms: float):
        async with serving(llama_dir, run_ahead_ms=run_ahead_ms) as engine:
            return await asyncio.gather(*(collect(engine, ask(engine, p, seed=i, max_tokens=20 + 7 * i, **sampling))
                                          for i, p in enumerate(PROMPTS)))

    on, off = run(outputs(4.0)), run(outputs(0.0))
    assert [tokens(e) for e in on] == [tokens(e) for e in off]
    assert all(len(e) == len(tokens(e)) for e in off)
    assert sum(map(len, on)) < sum(map(len, off))  # runs of several tokens


def test_a_request_with_nothing_to_draw_fails_alone(llama_dir):
    """A sampled request whose logits cannot be drawn from ends with an error naming why; greedy neighbours go on."""
    from lifecycle.serve import sampler as sampler_module

    def refuse(self, logits, sampling, seed, counter):
        raise ValueError(NOTHING_TO_DRAW)

    async def main():
        async with serving(llama_dir, run_ahead_ms=0) as engine:
            old = sampler_module.Sampler.draw
            sampler_module.Sampler.draw = refuse
            try:
                return await asyncio.gather(collect(engine, ask(engine, PROMPTS[0], temperature=1.0, max_tokens=5)),
                                            collect(engine, ask(engine, PROMPTS[1], max_tokens=5)))
            finally:
                sampler_module.Sampler.draw = old

    sampled, greedy = run(main())
    assert sampled[-1].finish_reason == "error" and "no token can be drawn" in sampled[-1].error
    assert greedy[-1].finish_reason == "length" and len(tokens(greedy)) == 5


def test_a_run_gives_each_tokens_log_prob(tokenizer):
    """decode_run(logprobs=True): each token's log_softmax under its step's logits, as single steps compute it (to
    float rounding), for greedy and sampled rows alike."""
    served = ServedModel(random_model("llama"), tokenizer, "base", native=True)
    batch = _prefilled(random_model("llama"), 2, 5)
    reference = copy.deepcopy(batch)
    draws = [(0.0, 0, 1.0, 0, 1), (1.0, 0, 1.0, 9, 1)]
    with torch.no_grad():
        tokens, scores = served.decode_run("base", [2, 3], batch, 6, draws, logprobs=True)
        ids, want = [2, 3], [[], []]
        for step in range(6):
            logits = served.decode("base", ids, reference)
            lp = torch.log_softmax(logits, -1)
            ids = [tokens[0][step], tokens[1][step]]
            for r in range(2):
                want[r].append(float(lp[r, ids[r]]))
    assert torch.allclose(torch.tensor(scores), torch.tensor(want), atol=1e-4), (scores, want)
    assert all(s < 0 for row in scores for s in row)


def test_engine_requests_with_their_tokens_log_probs_run_ahead(llama_dir):
    """logprobs=0 (what the REST front end asks of every request, for the usage log): run ahead, the same tokens and,
    to float rounding, the same log-probs as one step at a time; top log-probs (logprobs=2) keep single steps."""
    async def outputs(run_ahead_ms: float, logprobs: int):
        async with serving(llama_dir, run_ahead_ms=run_ahead_ms) as engine:
            return await asyncio.gather(*(collect(engine, ask(engine, p, seed=i, max_tokens=24, logprobs=logprobs,
                                                              temperature=0.9 * (i % 2)))
                                          for i, p in enumerate(PROMPTS)))

    on, off = run(outputs(4.0, 0)), run(outputs(0.0, 0))
    assert [tokens(e) for e in on] == [tokens(e) for e in off]
    for a, b in zip(on, off):
        got = [lp.logprob for e in a for lp in e.logprobs]
        want = [lp.logprob for e in b for lp in e.logprobs]
        assert len(got) == len(want) == len(tokens(a)) and all(lp.top == {} for e in a for lp in e.logprobs)
        assert [lp.token for e in a for lp in e.logprobs] == [lp.token for e in b for lp in e.logprobs]
        assert max(abs(x - y) for x, y in zip(got, want)) < 1e-4
    assert sum(map(len, on)) < sum(map(len, off))  # runs of several tokens
    top = run(outputs(4.0, 2))
    assert all(len(e) == len(tokens(e)) for e in top)  # one event a token: no run-ahead
