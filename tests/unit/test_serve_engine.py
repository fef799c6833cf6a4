"""LocalEngine on tiny random Llama and GPT-2 models: parity with HF generate, batching, limits, faults, adapters."""
from __future__ import annotations

import asyncio
import os
import shutil
import time
from contextlib import asynccontextmanager

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lifecycle.data.tokenizer import train_bpe
from lifecycle.errors import CheckpointError
from lifecycle.serve.detok import StopMatcher
from lifecycle.serve.engine import LocalEngine
from lifecycle.serve.protocol import (ContextTooLong, EngineError, GenerationRequest, InvalidPrompt, ModelNotFound,
                                      NoChatTemplate, NotReady, Overloaded, Sampling)
from lifecycle.serve.scheduler import Scheduler
from lifecycle.serve.served import ServedModel
from lifecycle.training.instruct_data import CHAT_TEMPLATE

torch.set_num_threads(1)
TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
         "import os\nprint(os.getcwd())\n", "for i in range(10):\n    total += i * i\n"] * 20
PROMPTS = ["def add", "The quick brown fox jumps over", "import os\nprint(os.", "x", "for i in range(10):\n   "]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TEXTS, vocab_size=320, min_frequency=1, model_max_length=128)


def _save(model, tokenizer, directory):
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0)
    return _save(LlamaForCausalLM(config), tokenizer, tmp_path_factory.mktemp("root") / "llama")


@pytest.fixture(scope="module")
def gpt2_dir(tokenizer, tmp_path_factory):
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    return _save(GPT2LMHeadModel(config), tokenizer, tmp_path_factory.mktemp("root") / "gpt2")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@asynccontextmanager
async def serving(directory, **settings):
    engine = LocalEngine(str(directory), **{"max_batch_size": 4, "max_queue": 4, **settings})
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


def ask(engine, prompt, model=None, **sampling) -> GenerationRequest:
    ids = engine.encode(prompt) if isinstance(prompt, str) else prompt
    return GenerationRequest(ids, Sampling(**{"temperature": 0, **sampling}), model or engine.name)


async def collect(engine, req, after=None):
    """All events of one generation; `after`: an asyncio.Event to wait for before asking."""
    if after is not None:
        await after.wait()
    return [event async for event in engine.generate(req)]


def tokens(events) -> list[int]:
    return [t for e in events for t in e.token_ids]


def hf_greedy(model, ids, n) -> list[int]:
    inputs = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


async def wait_idle(engine, seconds=2.0):
    end = time.monotonic() + seconds
    while engine.stats() != {"running": 0, "queued": 0} and time.monotonic() < end:
        await asyncio.sleep(0.01)
    return engine.stats()


def ids_of(tokenizer, prompt) -> list[int]:
    return tokenizer.encode(prompt, add_special_tokens=False)


@pytest.mark.parametrize("family", ["llama_dir", "gpt2_dir"])
def test_greedy_equals_hf_generate_alone_and_joining_a_running_batch(family, request, tokenizer):
    directory = request.getfixturevalue(family)
    model = (LlamaForCausalLM if family == "llama_dir" else GPT2LMHeadModel).from_pretrained(directory).eval()

    async def main():
        async with serving(directory) as engine:
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
    advance = Scheduler._advance

    def flaky(self, job, *args, **kwargs):
        if job.request.request_id == "boom" and job.completion == 3:
            raise RuntimeError("injected fault")
        return advance(self, job, *args, **kwargs)
    monkeypatch.setattr(Scheduler, "_advance", flaky)

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


def test_chat_template_or_a_clear_refusal(llama_dir, tokenizer, tmp_path):
    chat_dir = tmp_path / "chat"
    shutil.copytree(llama_dir, chat_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(chat_dir)
    tokenizer.chat_template = None
    messages = [{"role": "user", "content": "add two numbers"}]

    async def main():
        async with serving(llama_dir) as plain:
            with pytest.raises(NoChatTemplate, match="no chat template"):
                plain.render_chat(messages)
        async with serving(chat_dir) as chat:
            return chat.render_chat(messages), chat.decode(chat.render_chat(messages))

    ids, text = run(main())
    assert text.endswith("<|assistant|>\n") and "add two numbers" in text
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    finally:
        tokenizer.chat_template = None
    assert ids == list(expected)


def test_truncated_weights_fail_start_naming_the_file(llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])

    async def main():
        engine = LocalEngine(str(broken))
        with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
            await engine.start()
        return engine

    engine = run(main())
    assert not engine.ready and "truncated" in str(engine.load_error)


@pytest.fixture(scope="module")
def loras(llama_dir):
    """Two LoRA adapters with random (non-zero) weights, saved under the model root's adapters/."""
    from peft import LoraConfig, get_peft_model

    dirs = {}
    for i, name in enumerate(("a1", "a2")):
        torch.manual_seed(10 + i)
        base = LlamaForCausalLM.from_pretrained(llama_dir)
        config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False)
        dirs[name] = llama_dir.parent / "adapters" / name
        get_peft_model(base, config).save_pretrained(dirs[name])
    return dirs


def peft_greedy(llama_dir, loras, ids, n) -> dict[str, list[int]]:
    """Greedy tokens of the base and of each adapter, through PeftModel with that adapter set."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_dir), loras["a1"], adapter_name="a1")
    model.load_adapter(loras["a2"], adapter_name="a2")
    model.eval()
    out = {}
    for name in ("a1", "a2"):
        model.set_adapter(name)
        out[name] = hf_greedy(model, ids, n)
    with model.disable_adapter():
        out["llama"] = hf_greedy(model, ids, n)
    return out


def test_two_loras_and_the_base_served_at_once_match_peft(llama_dir, loras, tokenizer):
    async def main():
        adapters = {name: str(path) for name, path in loras.items()}
        async with serving(llama_dir, adapters=adapters) as engine:
            names = engine.model_names()
            results = await asyncio.gather(*(collect(engine, ask(engine, PROMPTS[k], model=name, max_tokens=16))
                                             for k in (1, 2) for name in names))
            return names, [tokens(r) for r in results]

    names, got = run(main())
    assert names == ["llama", "a1", "a2"]
    for k, prompt in enumerate((PROMPTS[1], PROMPTS[2])):
        expected = peft_greedy(llama_dir, loras, ids_of(tokenizer, prompt), 16)
        assert len({tuple(v) for v in expected.values()}) == 3  # the adapters change the output
        assert got[3 * k:3 * k + 3] == [expected[name] for name in names]


def test_runtime_adapters_stay_inside_the_model_root(llama_dir, loras, tmp_path):
    from peft import PromptTuningConfig, get_peft_model

    outside = tmp_path / "outside"
    shutil.copytree(loras["a1"], outside)
    root = llama_dir.parent
    link = root / "adapters" / "leads_out"
    if not link.exists():
        os.symlink(outside, link)
    prompt_tuned = root / "adapters" / "prompt_tuned"
    get_peft_model(LlamaForCausalLM.from_pretrained(llama_dir),
                   PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(prompt_tuned)

    async def main():
        async with serving(llama_dir, model_root=str(root)) as engine:
            for path in (str(outside), "../../outside", str(link), "adapters/leads_out", "adapters/missing"):
                with pytest.raises(ModelNotFound):
                    await engine.load_adapter("x", path)
            with pytest.raises(EngineError, match="LORA, IA3, BOTTLENECK") as refused:
                await engine.load_adapter("pt", "adapters/prompt_tuned")
            running = asyncio.create_task(collect(engine, ask(engine, PROMPTS[1], max_tokens=40)))
            await asyncio.sleep(0.02)
            await engine.load_adapter("a3", "adapters/a2")  # between decode steps of the running job
            names = engine.model_names()
            served = await collect(engine, ask(engine, PROMPTS[1], model="a3", max_tokens=8))
            await engine.unload_adapter("a3")
            with pytest.raises(ModelNotFound):
                await engine.generate(ask(engine, PROMPTS[1], model="a3")).__anext__()
            return names, tokens(served), await running, str(refused.value)

    names, served, running, refused = run(main())
    assert names == ["llama", "a3"] and len(served) == 8
    assert running[-1].finish_reason in ("length", "stop") and "optimize" in refused


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
