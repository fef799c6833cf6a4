"""LocalEngine on tiny random Llama and GPT-2 models: parity with HF generate, batching, sampling, limits, faults."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch
from serve_models import (PROMPTS, ask, collect, gpt2_dir, hf_greedy, ids_of, llama_dir, run, serving,  # noqa: F401
                          tokenizer, tokens, wait_idle)
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from lifecycle.serve.detok import StopMatcher
from lifecycle.serve.engine import LocalEngine
from lifecycle.serve.protocol import (ContextTooLong, GenerationRequest, InvalidPrompt, ModelNotFound, NotReady,
                                      Overloaded, Sampling)
from lifecycle.serve.scheduler import Scheduler
from lifecycle.serve.served import ServedModel


@pytest.mark.parametrize("family", ["llama_dir", "gpt2_dir"])
def test_greedy_equals_hf_generate_alone_and_joining_a_running_batch(family, request, tokenizer):
    directory = request.getfixturevalue(family)
    model = (LlamaForCausalLM if family == "llama_dir" else GPT2LMHeadModel).from_pretrained(directory).eval()

    async def main():
        # one step per event (no run-ahead), so the others join after the leader's 5th token; test_serve_run_ahead
        # compares run-ahead's output with this step-by-step decoding
        async with serving(directory, run_ahead_ms=0) as engine:
            alone = [tokens(await collect(engine, ask(engine, p, max_tokens=24))) for p in PROMPTS[:3]]
            # The first job runs alone for a few steps; the others join its batch mid-run.
            joined, events = asyncio.Event(), []

            async def leader():
                async for event in engine.generate(ask(engine, PROMPTS[0], max_tokens=40)):
                    events.append(event)
                    if len(events) == 5:
                        joined.set()
            together = await asyncio.gather(leader(), *(collect(engine, ask(engine, p, max_tokens=24), joined)
                                                        for p in PROMPTS[1:]))
            return alone, tokens(events), [tokens(t) for t in together[1:]]

    alone, lead, others = run(main())
    ids = [ids_of(tokenizer, p) for p in PROMPTS]
    assert lead == hf_greedy(model, ids[0], 40)
    for i, got in enumerate(alone):
        assert got == hf_greedy(model, ids[i], 24)
    for i, got in enumerate(others, start=1):
        assert got == hf_greedy(model, ids[i], 24), PROMPTS[i]


def test_seeded_sampling_is_the_same_whatever_shares_the_batch(llama_dir):
    sampling = {"temperature": 1.0, "top_k": 50, "top_p": 0.9, "max_tokens": 20}

    async def main():
        async with serving(llama_dir) as engine:
            alone = tokens(await collect(engine, ask(engine, PROMPTS[1], seed=7, **sampling)))
            crowd = await asyncio.gather(
                collect(engine, ask(engine, PROMPTS[1], seed=7, **sampling)),
                *(collect(engine, ask(engine, p, seed=i, temperature=1.3, max_tokens=30)) for i, p in
                  enumerate(PROMPTS[2:])))
            other = tokens(await collect(engine, ask(engine, PROMPTS[1], seed=8, **sampling)))
            return alone, tokens(crowd[0]), other

    alone, in_crowd, other_seed = run(main())
    assert alone == in_crowd
    assert other_seed != alone  # the seed matters: 20 sampled tokens from a random model never coincide


def test_stop_sequence_eos_and_max_tokens_end_generations(llama_dir, tokenizer):
    async def main():
        async with serving(llama_dir) as engine:
            full = await collect(engine, ask(engine, PROMPTS[1], max_tokens=30))
            text = "".join(e.text for e in full)
            stop = text[12:15]
            cut = await collect(engine, ask(engine, PROMPTS[1], max_tokens=30, stop=("\x00never", stop)))
            eos = await collect(engine, ask(engine, PROMPTS[0], max_tokens=30))  # this model says EOS at token 18
            return full, text, stop, cut, eos

    full, text, stop, cut, eos = run(main())
    assert full[-1].finish_reason == "length" and full[-1].completion_tokens == len(tokens(full)) == 30
    assert full[-1].prompt_tokens == len(ids_of(tokenizer, PROMPTS[1]))
    assert text == tokenizer.decode(tokens(full), skip_special_tokens=True)
    assert cut[-1].finish_reason == "stop" and stop not in "".join(e.text for e in cut)
    assert "".join(e.text for e in cut) == text[:text.index(stop)]
    assert len(tokens(cut)) < 30
    assert eos[-1].finish_reason == "stop" and tokens(eos)[-1] == tokenizer.eos_token_id
    assert len(tokens(eos)) == 18 and "endoftext" not in "".join(e.text for e in eos)


def test_stop_matcher_holds_a_possible_start_and_releases_it():
    m = StopMatcher(("world", "xyz"))
    assert m.feed("hello wor") == ("hello ", False)  # "wor" may begin "world"
    assert m.feed("k") == ("work", False)            # it did not
    assert m.feed("s x") == ("s ", False)
    assert m.feed("yz tail") == ("", True)
    end = StopMatcher(("abc",))
    assert end.feed("xab") == ("x", False) and end.flush() == "ab"


def test_echo_logprobs_equal_a_direct_forward(llama_dir, tokenizer):
    model = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    ids = ids_of(tokenizer, PROMPTS[4])

    async def main():
        async with serving(llama_dir) as engine:
            return await collect(engine, ask(engine, ids, max_tokens=1, logprobs=3, echo=True))

    events = run(main())
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)  # (L, V)
    expected = lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    prompt = events[0].prompt_logprobs
    assert prompt[0].logprob is None and len(prompt) == len(ids)
    got = torch.tensor([t.logprob for t in prompt[1:]])
    assert torch.allclose(got, expected, atol=1e-4)
    assert abs(got.sum().item() - expected.sum().item()) < 1e-3
    generated = events[0].logprobs[0]
    assert generated.logprob == pytest.approx(lp[-1].max().item(), abs=1e-4)  # greedy: the likeliest token
    assert len(generated.top) == 3 and max(generated.top.values()) == pytest.approx(generated.logprob, abs=1e-6)
    assert events[0].token_ids == [int(lp[-1].argmax())]


def test_closing_the_stream_frees_the_slot_and_later_requests_are_fine(llama_dir):
    async def main():
        async with serving(llama_dir) as engine:
            stream = engine.generate(ask(engine, PROMPTS[0], max_tokens=100))
            await stream.__anext__()
            await stream.aclose()
            after_close = await wait_idle(engine)

            async def consume():
                async for _ in engine.generate(ask(engine, PROMPTS[1], max_tokens=100)):
                    pass
            task = asyncio.create_task(consume())
            await asyncio.sleep(0.05)
            task.cancel()
            after_cancel = await wait_idle(engine)
            later = await collect(engine, ask(engine, PROMPTS[2], max_tokens=5))
            return after_close, after_cancel, later, await wait_idle(engine)

    after_close, after_cancel, later, end = run(main())
    assert after_close == after_cancel == end == {"running": 0, "queued": 0}
    assert later[-1].finish_reason == "length" and len(tokens(later)) == 5


def slow_steps(monkeypatch, seconds):
    """Each decode step takes at least `seconds` (so tests can see jobs running and queued)."""
    decode = ServedModel.decode

    def slow(self, *args):
        time.sleep(seconds)
        return decode(self, *args)
    monkeypatch.setattr(ServedModel, "decode", slow)


def test_overloaded_beyond_batch_plus_queue(llama_dir, monkeypatch):
    slow_steps(monkeypatch, 0.01)

    async def main():
        async with serving(llama_dir, max_batch_size=1, max_queue=1) as engine:
            held = [engine.generate(ask(engine, PROMPTS[0], max_tokens=30)) for _ in range(2)]
            firsts = [asyncio.create_task(s.__anext__()) for s in held]
            await asyncio.sleep(0.05)
            stats = engine.stats()
            with pytest.raises(Overloaded) as refused:
                await engine.generate(ask(engine, PROMPTS[1])).__anext__()
            await asyncio.gather(*firsts)
            for s in held:
                await s.aclose()
            return stats, refused.value, await wait_idle(engine)

    stats, refused, end = run(main())
    assert stats == {"running": 1, "queued": 1}
    assert refused.retry_after > 0 and "1 + 1" in str(refused)
    assert end == {"running": 0, "queued": 0}


def test_deadline_ends_the_job_with_timeout(llama_dir, monkeypatch):
    slow_steps(monkeypatch, 0.01)

    async def main():
        async with serving(llama_dir) as engine:
            req = ask(engine, PROMPTS[0], max_tokens=100)
            req.deadline = time.monotonic() + 0.15
            late = ask(engine, PROMPTS[1], max_tokens=5)
            late.deadline = time.monotonic() - 1
            return (await collect(engine, req), await collect(engine, late), await wait_idle(engine))

    running, late, end = run(main())
    assert running[-1].finish_reason == "timeout" and 0 < running[-1].completion_tokens < 100
    assert late[-1].finish_reason == "timeout" and late[-1].completion_tokens == 0
    assert end == {"running": 0, "queued": 0}


def test_a_failure_mid_generation_ends_only_that_job(llama_dir, monkeypatch):
    accept = Scheduler._accept  # every token goes through it, one step at a time or in a run

    def flaky(self, job, *args, **kwargs):
        if job.request.request_id == "boom" and job.completion == 3:
            raise RuntimeError("injected fault")
        return accept(self, job, *args, **kwargs)
    monkeypatch.setattr(Scheduler, "_accept", flaky)

    async def main():
        async with serving(llama_dir) as engine:
            boom = ask(engine, PROMPTS[0], max_tokens=20)
            boom.request_id = "boom"
            results = await asyncio.gather(collect(engine, boom), *(collect(engine, ask(engine, p, max_tokens=20))
                                                                     for p in PROMPTS[1:3]))
            after = await collect(engine, ask(engine, PROMPTS[3], max_tokens=4))
            return results, after, await wait_idle(engine)

    (failed, *others), after, end = run(main())
    assert failed[-1].finish_reason == "error" and "injected fault" in failed[-1].error
    assert len(tokens(failed)) == 3
    assert all(o[-1].finish_reason == "length" and len(tokens(o)) == 20 for o in others)
    assert after[-1].finish_reason == "length" and end == {"running": 0, "queued": 0}


def test_refusals_before_any_event(llama_dir):
    async def main():
        engine = LocalEngine(str(llama_dir), max_batch_size=2, max_queue=2)
        with pytest.raises(NotReady):
            await engine.generate(GenerationRequest([1, 2], Sampling(), "llama")).__anext__()
        async with serving(llama_dir) as engine:
            assert engine.context_length == 128
            errors = {}
            for key, req in {"long": ask(engine, [5] * 129, max_tokens=1),
                             "sum": ask(engine, [5] * 100, max_tokens=40),
                             "model": ask(engine, [5], model="nope"),
                             "vocab": ask(engine, [5, 10_000])}.items():
                with pytest.raises((ContextTooLong, ModelNotFound, InvalidPrompt)) as e:
                    await engine.generate(req).__anext__()
                errors[key] = e.value
            return errors

    errors = run(main())
    assert isinstance(errors["long"], ContextTooLong) and "129" in str(errors["long"]) and "128" in str(errors["long"])
    summed = str(errors["sum"])
    assert isinstance(errors["sum"], ContextTooLong) and all(n in summed for n in ("100", "40", "140", "128", "28"))
    assert isinstance(errors["model"], ModelNotFound) and "llama" in str(errors["model"])
    assert isinstance(errors["vocab"], InvalidPrompt) and "10000" in str(errors["vocab"])


@pytest.mark.parametrize("family", ["llama_dir", "gpt2_dir"])
def test_padded_prefill_and_a_decode_step_equal_plain_forwards(family, request, tokenizer):
    from lifecycle.models.load import load_model
    from lifecycle.serve.batch import merge

    model, tok = load_model(request.getfixturevalue(family))
    served = ServedModel(model, tok, "base")
    prompts = [ids_of(tokenizer, p) for p in PROMPTS[1:4]]  # 3 lengths: left padding up to 8 columns
    with torch.no_grad():
        logits, batch = served.prefill("base", prompts, all_logits=True)
        _, late = served.prefill("base", [ids_of(tokenizer, PROMPTS[0])], all_logits=False)
        batch = merge([(batch, [0, 2]), (late, [0])])  # one row leaves, one joins
        rows = [prompts[0], prompts[2], ids_of(tokenizer, PROMPTS[0])]
        stepped = served.decode("base", [7, 8, 9], batch)  # (3, V)
        for p, got in zip(prompts, logits):
            assert torch.allclose(got, model(torch.tensor([p])).logits[0], atol=1e-4)
        for row, token, got in zip(rows, [7, 8, 9], stepped):
            assert torch.allclose(got, model(torch.tensor([row + [token]])).logits[0, -1], atol=1e-4)


def test_the_model_loads_on_the_decode_thread_and_a_failed_load_leaves_no_thread(llama_dir, tmp_path, monkeypatch):
    # One thread does all the torch work: a second OpenMP master (a pool thread that loaded the model) makes libgomp
    # stop spinning between parallel regions, and every small op of a decode step then pays a futex wake-up.
    import threading

    load, loaders = LocalEngine._load, []

    def recording(self):
        loaders.append(threading.current_thread().name)
        return load(self)
    monkeypatch.setattr(LocalEngine, "_load", recording)

    async def main():
        async with serving(llama_dir) as engine:
            decoder = engine._scheduler.thread.name
            events = await collect(engine, ask(engine, PROMPTS[0], max_tokens=3))
        broken = LocalEngine(str(tmp_path / "missing"), max_batch_size=1, max_queue=1)
        with pytest.raises(Exception):
            await broken.start()
        return decoder, events

    decoder, events = run(main())
    assert loaders == [decoder, decoder] and events[-1].completion_tokens == 3
    assert not [t for t in threading.enumerate() if t.name == decoder]


def test_batches_the_scheduler_drops_free_their_cache_at_once(llama_dir):
    """Jobs joining and leaving rebuild the batch (merge); each replaced batch must free its keys and values when
    dropped, not linger in a reference cycle until the garbage collector's next pass (with the collector off here,
    a cycle would leave every replaced batch alive)."""
    import gc

    from lifecycle.serve.batch import Batch

    async def main():
        async with serving(llama_dir) as engine:
            await collect(engine, ask(engine, PROMPTS[0], max_tokens=4))
            gc.collect()
            gc.disable()
            try:
                before = sum(isinstance(o, Batch) for o in gc.get_objects())
                started = asyncio.Event()

                async def leader():
                    async for event in engine.generate(ask(engine, PROMPTS[0], max_tokens=30)):
                        started.set()
                await asyncio.gather(leader(), *(collect(engine, ask(engine, p, max_tokens=3 + 4 * i), started)
                                                 for i, p in enumerate(PROMPTS[1:])))
                await wait_idle(engine)
                return before, sum(isinstance(o, Batch) for o in gc.get_objects())
            finally:
                gc.enable()

    before, after = run(main())
    assert after <= before + 1, (before, after)  # at most the last batch, kept by an idle group
