"""Steps taken several per C call (ServedModel.decode_run, Scheduler._run_ahead): greedy, the same tokens as one step
at a time with each argmax fed back, across capacity growths and rope table growth, ties and NaNs resolved as numpy's
argmax does; in the engine, the same output as with run-ahead off, runs cut at EOS, stop strings and max_tokens, and
single steps whenever a row wants log-probs or a newcomer waits. (Sampled runs: test_serve_sampling.py.)"""
from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from serve_models import PROMPTS, ask, collect, llama_dir, run, serving, tokenizer, tokens  # noqa: F401
from test_serve_fastpath import random_model, sharp_llama_dir, small_grow  # noqa: F401
from test_serve_native import _prefilled

from lifecycle.errors import ConfigError
from lifecycle.serve.batch import Batch
from lifecycle.serve.engine import LocalEngine
from lifecycle.serve.protocol import GenerationRequest, Sampling
from lifecycle.serve.sampler import greedy_tokens
from lifecycle.serve.scheduler import Group, Job, Scheduler
from lifecycle.serve.served import ServedModel


def _one_at_a_time(served: ServedModel, batch: Batch, ids: list[int], n: int) -> list[list[int]]:
    out = [[] for _ in ids]
    with torch.no_grad():
        for _ in range(n):
            ids = greedy_tokens(served.decode("base", ids, batch))
            for row, token in zip(out, ids):
                row.append(token)
    return out


def _runs(served: ServedModel, batch: Batch, ids: list[int], runs: list[int]) -> list[list[int]]:
    out = [[] for _ in ids]
    with torch.no_grad():
        for k in runs:
            got, _ = served.decode_run("base", ids, batch, k)
            for row, tokens_ in zip(out, got):
                row += tokens_
            ids = [row[-1] for row in got]
    return out


@pytest.mark.parametrize("family", ["llama", "llama_gqa", "qwen3", "llama_int8"])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_runs_equal_single_steps_fed_their_argmax(family, rows, tokenizer, small_grow):  # GROW 4: runs of 6 grow it
    served = ServedModel(random_model(family), tokenizer, "base", native=True)
    assert served.runs_ahead("base")
    batch = _prefilled(random_model(family), rows, 5)
    reference = copy.deepcopy(batch)
    ids = list(range(2, 2 + rows))
    capacity = batch.valid.shape[1]
    got = _runs(served, batch, ids, [6, 1, 5, 6])
    assert batch.valid.shape[1] > capacity
    want = _one_at_a_time(served, reference, ids, 18)
    assert got == want
    assert batch.t == reference.t and torch.equal(batch.positions, reference.positions)
    for mine, theirs in zip(batch.layers, reference.layers):
        assert torch.equal(mine.keys[:, :, :batch.t], theirs.keys[:, :, :batch.t])
    assert torch.equal(batch.valid[:, :batch.t], reference.valid[:, :batch.t])


def test_a_run_past_the_rope_table_grows_it_first(tokenizer):
    served = ServedModel(random_model("llama"), tokenizer, "base", native=True)
    served.fast.native._tables(10)  # the prompt reaches position 8: a run of 6 ends at 13
    batch = _prefilled(random_model("llama"), 2, 8)
    reference = copy.deepcopy(batch)
    got = _runs(served, batch, [3, 4], [6])
    assert served.fast.native.model.max_pos >= 14
    assert got == _one_at_a_time(served, reference, [3, 4], 6)


@pytest.mark.parametrize("poison", ["ties", "nan"])
def test_ties_and_nans_pick_the_first_index_as_numpy_does(poison, tokenizer):
    def model():
        m = random_model("llama_gqa")
        with torch.no_grad():
            if poison == "ties":
                m.lm_head.weight.zero_()  # every logit 0: the first index wins
            else:
                m.lm_head.weight[[7, 11]] = float("nan")  # NaN at 7 and 11: numpy returns the first NaN
        return m
    served = ServedModel(model(), tokenizer, "base", native=True)
    batch = _prefilled(model(), 2, 4)
    reference = copy.deepcopy(batch)
    got = _runs(served, batch, [3, 4], [4])
    assert got == _one_at_a_time(served, reference, [3, 4], 4)
    assert got == ([[0] * 4] * 2 if poison == "ties" else [[7] * 4] * 2)


def test_a_bad_token_id_is_refused_before_anything_is_written(tokenizer):
    served = ServedModel(random_model("llama"), tokenizer, "base", native=True)
    batch = _prefilled(random_model("llama"), 2, 4)
    before = [layer.keys.clone() for layer in batch.layers]
    with pytest.raises(ValueError, match="outside the embedding's 320 rows"):
        served.decode_run("base", [3, 320], batch, 4)
    assert all(torch.equal(a, layer.keys[:, :, :a.shape[2]]) for a, layer in zip(before, batch.layers))


def test_models_without_the_c_step_do_not_run_ahead(tokenizer):
    assert not ServedModel(random_model("llama"), tokenizer, "base", native=False).runs_ahead("base")
    assert not ServedModel(random_model("llama"), tokenizer, "base", fast_decode=False).runs_ahead("base")
    assert not ServedModel(random_model("llama"), tokenizer, "base", native=True).runs_ahead("an-adapter")


class _Served:
    """What Scheduler._run_ahead asks of the model."""

    def runs_ahead(self, name: str) -> bool:
        return True


def _job(temperature: float = 0.0, logprobs: int | None = None, max_tokens: int = 100) -> Job:
    request = GenerationRequest([1, 2], Sampling(max_tokens=max_tokens, temperature=temperature, logprobs=logprobs),
                                "base")
    return Job(request, lambda event: None, None, None, 0)


@pytest.mark.parametrize("case, want", [
    ("greedy", 8), ("one samples", 8), ("one wants its tokens' log-probs", 8), ("one wants top log-probs", 1), ("a newcomer waits", 1),
    ("the queue waits for a full batch", 8), ("a control call waits", 1), ("no timing yet", 1), ("off", 1),
    ("slow steps", 1), ("few tokens left", 3), ("fast steps", 16)])
def test_when_the_scheduler_runs_ahead(case, want):
    scheduler = Scheduler(_Served(), max_batch_size=2, run_ahead=0.004)
    jobs = [_job(), _job()]
    group = Group(jobs=jobs, step_seconds=0.0005)
    scheduler.running = 2
    if case == "one samples":
        jobs[1] = _job(temperature=0.7)
    elif case == "one wants its tokens' log-probs":
        jobs[0] = _job(logprobs=0)
    elif case == "one wants top log-probs":
        jobs[0] = _job(logprobs=1)
    elif case == "a newcomer waits":
        scheduler.running = 1
        scheduler.pending.append(_job())
    elif case == "the queue waits for a full batch":
        scheduler.pending.append(_job())
    elif case == "a control call waits":
        scheduler.controls.append((lambda: None, None))
    elif case == "no timing yet":
        group.step_seconds = None
    elif case == "off":
        scheduler.run_ahead = 0.0
    elif case == "slow steps":
        group.step_seconds = 0.003
    elif case == "few tokens left":
        jobs[:] = [_job(max_tokens=3), _job(max_tokens=2)]
    elif case == "fast steps":
        group.step_seconds = 0.00001
    assert scheduler._run_ahead("base", group) == want


def test_the_engine_refuses_a_negative_run_ahead(tmp_path):
    with pytest.raises(ConfigError, match="run_ahead_ms must be >= 0"):
        LocalEngine(str(tmp_path), run_ahead_ms=-1)


def test_engine_output_is_the_same_with_and_without_run_ahead(sharp_llama_dir):
    """Greedy jobs of different lengths decoded together (leaving at different steps) and alone: the same tokens,
    delivered in fewer events with run-ahead on."""
    async def outputs(run_ahead_ms: float):
        async with serving(sharp_llama_dir, run_ahead_ms=run_ahead_ms) as engine:
            together = await asyncio.gather(*(collect(engine, ask(engine, p, max_tokens=20 + 13 * i))
                                              for i, p in enumerate(PROMPTS)))
            alone = await collect(engine, ask(engine, PROMPTS[0], max_tokens=45))
            return [*together, alone]

    on, off = run(outputs(4.0)), run(outputs(0.0))
    assert [tokens(e) for e in on] == [tokens(e) for e in off]
    assert [len(tokens(e)) for e in on[:-1]] == [20 + 13 * i for i in range(len(PROMPTS))]
    assert ["".join(x.text for x in e) for e in on] == ["".join(x.text for x in e) for e in off]
    assert all(len(e) == len(tokens(e)) for e in off)  # one event a token
    assert sum(map(len, on)) < sum(map(len, off)) / 2  # runs of several tokens
    assert [e[-1].finish_reason for e in on] == [e[-1].finish_reason for e in off]
    assert [e[-1].completion_tokens for e in on] == [len(tokens(e)) for e in on]


def test_runs_end_at_eos_and_at_stop_strings(llama_dir):
    async def main(run_ahead_ms: float):
        async with serving(llama_dir, run_ahead_ms=run_ahead_ms) as engine:
            eos = await collect(engine, ask(engine, PROMPTS[0], max_tokens=30))  # this model says EOS at token 18
            full = await collect(engine, ask(engine, PROMPTS[1], max_tokens=30))
            stop = "".join(e.text for e in full)[12:15]
            cut = await collect(engine, ask(engine, PROMPTS[1], max_tokens=30, stop=(stop,)))
            return eos, full, stop, cut

    (eos, full, stop, cut), (eos_off, _, _, cut_off) = run(main(4.0)), run(main(0.0))
    assert tokens(eos) == tokens(eos_off) and len(tokens(eos)) == 18 and eos[-1].finish_reason == "stop"
    text = "".join(e.text for e in full)
    assert "".join(e.text for e in cut) == text[:text.index(stop)] == "".join(e.text for e in cut_off)
    assert cut[-1].finish_reason == "stop"
