"""The fast decode path (lifecycle.serve.fastpath) against the HF forward: logits step by step through joins, leaves and
capacity growth, per supported family; the engine's greedy output with it on and off; what it refuses."""
from __future__ import annotations

import asyncio
import os
import copy

import pytest
import torch
from serve_models import PROMPTS, ask, collect, run, serving, tokenizer, tokens  # noqa: F401
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from lifecycle.models import int8
from lifecycle.serve import batch as batch_module
from lifecycle.serve import fastpath
from lifecycle.serve.batch import merge
from lifecycle.serve.served import ServedModel

DIMS = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**DIMS, num_key_value_heads=4)),
    "llama_gqa": lambda: LlamaForCausalLM(LlamaConfig(**DIMS, num_key_value_heads=2)),
    "llama_biases": lambda: LlamaForCausalLM(LlamaConfig(**DIMS, num_key_value_heads=1, attention_bias=True,
                                                         mlp_bias=True)),
    "llama_tied": lambda: LlamaForCausalLM(LlamaConfig(**DIMS, num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**DIMS, num_key_value_heads=2, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**DIMS, num_key_value_heads=2)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**DIMS, num_key_value_heads=2, head_dim=16)),
    "llama_int8": lambda: int8.quantize(LlamaForCausalLM(LlamaConfig(**DIMS, num_key_value_heads=2))),
}


def random_model(family: str):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    with torch.no_grad():  # random norm weights and biases, so a step that skips or misplaces one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.5)
    return model


def lockstep(fast: ServedModel, slow: ServedModel, steps: int) -> tuple[float, int]:
    """Prefill 3 prompts of different lengths into both, decode greedily in step, one row leaving and one joining
    after a few steps; the largest logit difference and the capacity grows seen."""
    prompts = [[5, 17, 33, 2, 9, 41, 7], [11, 3], [8, 8, 19, 250, 61]]
    worst, grows = 0.0, 0
    with torch.no_grad():
        batches = [m.prefill("base", prompts, all_logits=False)[1] for m in (fast, slow)]
        feed = [3, 4, 5]
        for step in range(steps):
            if step == 6:  # row 1 leaves, a longer prompt joins
                joins = [m.prefill("base", [[7] * 9 + [12, 99]], all_logits=False)[1] for m in (fast, slow)]
                batches = [merge([(b, [0, 2]), (j, [0])]) for b, j in zip(batches, joins)]
                feed = [feed[0], feed[2], 6]
            capacity = batches[0].valid.shape[1]
            got, want = (m.decode("base", feed, b) for m, b in zip((fast, slow), batches))
            grows += batches[0].valid.shape[1] > capacity
            worst = max(worst, (got - want).abs().nan_to_num(nan=float("inf")).max().item())  # NaN: the worst
            feed = want.argmax(-1).tolist()
    return worst, grows


def nan_empty(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """batch._empty's stand-in in tests: NaN where it would leave memory uninitialised."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture
def small_grow(monkeypatch):
    monkeypatch.setattr(batch_module, "GROW", 4)  # a capacity growth every 4 steps
    # and uninitialised storage NaN: a step that read a column nobody wrote would show
    monkeypatch.setattr(batch_module, "_empty", nan_empty)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_steps_equal_the_hf_forward_through_joins_leaves_and_growth(family, tokenizer, small_grow):
    model = random_model(family)
    reference = copy.deepcopy(model)  # untouched by the fusion
    fast, slow = ServedModel(model, tokenizer, "base"), ServedModel(reference, tokenizer, "base", fast_decode=False)
    assert fast.fast is not None and slow.fast is None
    calls = []
    model.forward = (lambda forward: lambda *a, **k: calls.append(1) or forward(*a, **k))(model.forward)
    worst, grows = lockstep(fast, slow, 24)
    assert worst < 1e-5 and grows >= 4
    assert len(calls) == 2  # the two prefills; every decode step ran on the fast path


def test_a_wrong_rope_fails_the_comparison(tokenizer, small_grow, monkeypatch):
    """Negative control: the comparison above catches a fast path that is subtly wrong."""
    model = random_model("llama_gqa")
    fast, slow = ServedModel(copy.deepcopy(model), tokenizer, "base"), ServedModel(model, tokenizer, "base", False)
    monkeypatch.setattr(fastpath, "_rope", lambda x, cos, sin: x * cos + x.flip(-1) * sin)
    assert lockstep(fast, slow, 8)[0] > 1e-3


def test_fast_path_follows_weights_replaced_after_the_fusion(tokenizer):
    model = random_model("llama_gqa")
    fast, slow = ServedModel(model, tokenizer, "base"), ServedModel(copy.deepcopy(model), tokenizer, "base", False)
    for m in (fast, slow):
        q = m.lm.model.layers[1].self_attn.q_proj
        q.weight.data = q.weight.data * 2  # a new tensor: the fused matrix no longer holds these rows
    assert fast.fast.stale()
    assert lockstep(fast, slow, 8)[0] < 1e-5
    assert not fast.fast.stale()


def test_bfloat16_steps_equal_the_hf_forward(tokenizer):
    model = random_model("llama_gqa").to(torch.bfloat16)
    fast, slow = ServedModel(model, tokenizer, "base"), ServedModel(copy.deepcopy(model), tokenizer, "base", False)
    assert lockstep(fast, slow, 12)[0] < 1e-5  # HF's half-precision norm reproduced: the same roundings


def _compiled(model):
    model.compile()  # an optimize `compile` variant: compiles at the first call, so nothing is compiled here
    return model


@pytest.mark.parametrize("change, reason", [
    (lambda m: GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4)), "gpt2"),
    (lambda m: LlamaForCausalLM(LlamaConfig(**DIMS, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                     "rope_theta": 10000.0})), "rope type 'linear'"),
    (lambda m: LlamaForCausalLM(LlamaConfig(**DIMS, hidden_act="gelu")), "activation 'gelu'"),
    (lambda m: MistralForCausalLM(MistralConfig(**DIMS, sliding_window=32)), "sliding-window"),
    (lambda m: Qwen2ForCausalLM(Qwen2Config(**DIMS, use_sliding_window=True, sliding_window=32,
                                            max_window_layers=1)), "sliding-window"),
    (lambda m: _compiled(LlamaForCausalLM(LlamaConfig(**DIMS))), "compiled"),
])
def test_unsupported_models_keep_the_hf_forward(change, reason, tokenizer):
    model = change(None).eval()
    assert reason in fastpath.unsupported(model)
    assert fastpath.build(model) is None and ServedModel(model, tokenizer, "base").fast is None


@pytest.fixture(scope="module")
def sharp_llama_dir(tokenizer, tmp_path_factory):
    """A random GQA Llama with large weights: peaked attention, so a wrong position or key changes greedy tokens
    (serve_models' llama_dir attends almost uniformly and hides such errors)."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**DIMS, "vocab_size": len(tokenizer)}, num_key_value_heads=2, initializer_range=0.3)
    directory = tmp_path_factory.mktemp("root") / "sharp"
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def sharp_long_llama_dir(tokenizer, tmp_path_factory):
    """sharp_llama_dir's model with a 512-token context: long jobs that outlast everything that runs beside them."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**DIMS, "vocab_size": len(tokenizer), "max_position_embeddings": 512},
                         num_key_value_heads=2, initializer_range=0.3)
    directory = tmp_path_factory.mktemp("root") / "sharp-long"
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_engine_greedy_output_is_the_same_with_and_without_the_fast_path(sharp_llama_dir):
    async def outputs(fast_decode: bool):
        async with serving(sharp_llama_dir, fast_decode=fast_decode, run_ahead_ms=0) as engine:  # step by step
            joined, first = asyncio.Event(), []

            async def leader():  # runs alone for 5 steps, then the others join its batch; they leave at different steps
                async for event in engine.generate(ask(engine, PROMPTS[0], max_tokens=60)):
                    first.append(event)
                    if len(first) == 5:
                        joined.set()
            others = await asyncio.gather(leader(), *(collect(engine, ask(engine, p, max_tokens=30 + 7 * i), joined)
                                                      for i, p in enumerate(PROMPTS[1:])))
            return engine._served.fast is not None, [tokens(first), *(tokens(o) for o in others[1:])]

    (fast_used, fast), (slow_used, slow) = run(outputs(True)), run(outputs(False))
    assert fast_used and not slow_used
    assert fast == slow and sum(map(len, fast)) > 150


def test_float32_weights_are_stored_transposed_once_and_the_tied_embedding_follows():
    # x @ W.T over (in, out) storage is MKL's faster product on the CPU; the modules keep their shapes and no weight
    # is held twice (fused q/k/v and gate/up are views of one storage each).
    model = random_model("llama_tied")
    embedding_before = model.model.embed_tokens.weight.detach().clone()
    fast = fastpath.build(model)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for linear in (attention.q_proj, attention.o_proj, mlp.down_proj, model.lm_head):
        assert linear.weight.shape == (linear.out_features, linear.in_features)
        assert linear.weight.stride(0) == 1 and not linear.weight.is_contiguous()  # its transpose is row-major
    storage = attention.q_proj.weight.untyped_storage().data_ptr()
    assert attention.v_proj.weight.untyped_storage().data_ptr() == storage
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embedding_before)  # same numbers, other strides
    assert not fast.stale()
    half = random_model("llama").to(torch.bfloat16)
    fastpath.build(half)
    assert half.model.layers[0].self_attn.o_proj.weight.is_contiguous()  # only float32 is transposed


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama_gqa", "qwen3"])
def test_the_compiled_step_equals_the_hf_forward_and_never_recompiles(family, tokenizer, monkeypatch):
    # Compiled at build for one row and for several; joins, leaves, capacity growths and new columns must then run
    # on those two graphs (a recompile is a ~20 s stall mid-serving). The scratch capacity equals head_dim (16), as
    # the default GROW (64) equals the 11M model's: a "duck" size guard would then fail at the first growth.
    import torch._dynamo.utils as dynamo_utils

    monkeypatch.setattr(batch_module, "GROW", DIMS["hidden_size"] // DIMS["num_attention_heads"])
    monkeypatch.setattr(batch_module, "_empty", nan_empty)  # it reads every column: its batches must be zeroed
    model = random_model(family)
    fast = ServedModel(model, tokenizer, "base", compile=True)
    slow = ServedModel(copy.deepcopy(random_model(family)), tokenizer, "base", fast_decode=False)
    assert fast.fast.compiled is not None
    compiles = dynamo_utils.counters["stats"]["unique_graphs"]
    worst, grows = lockstep(fast, slow, 24)
    assert worst < 1e-5 and grows >= 1
    assert dynamo_utils.counters["stats"]["unique_graphs"] == compiles


def test_int8_models_are_not_compiled(tokenizer):
    model = random_model("llama_int8")
    assert ServedModel(model, tokenizer, "base", compile=True).fast.compiled is None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's memory map (Linux)")
@pytest.mark.parametrize("family", ["llama_biases", "llama_tied"])
def test_the_fast_path_leaves_no_weight_viewing_the_checkpoint_file(family, tmp_path):
    """Weights load as views of the memory-mapped checkpoint. The fast path copies the projections, reading every
    page of the file, so it copies the rest too: nothing may still view the file, which would keep it all mapped
    and resident beside the copies. The outputs stay the HF forward's."""
    import gc

    from transformers import AutoModelForCausalLM

    random_model(family).save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    checkpoint = str(tmp_path / "m" / "model.safetensors")

    def mapped() -> bool:
        gc.collect()
        return checkpoint in open("/proc/self/maps").read()

    assert mapped()  # the control: loading maps the file
    ids = torch.tensor([[3, 7, 11, 19]])
    with torch.no_grad():
        before = model(ids).logits
        step = fastpath.build(model)
        assert step is not None and not mapped()
        assert torch.allclose(model(ids).logits, before, atol=1e-5)
        assert not step.stale()


@pytest.mark.parametrize("settings", [dict(fast_decode=True, run_ahead_ms=0), dict(fast_decode=False, run_ahead_ms=0),
                                      dict(fast_decode=True)], ids=["fast", "hf", "run-ahead"])
def test_newcomers_taking_finished_jobs_rows_decode_as_if_alone(sharp_long_llama_dir, settings, monkeypatch):
    """A finished job leaves its row to the next newcomer (Batch.adopt rewrites that row alone, no merge). On a
    model with peaked attention the newcomers' greedy tokens equal those they get alone only if the adopted row's
    keys, values, mask and positions are right; the adopt calls show the rows were adopted, not rebuilt."""
    adopted, real_adopt = [], batch_module.Batch.adopt
    monkeypatch.setattr(batch_module.Batch, "adopt", lambda self, *a: adopted.append(a[0]) or real_adopt(self, *a))

    async def main():
        async with serving(sharp_long_llama_dir, **settings) as engine:
            newcomers = [PROMPTS[3], PROMPTS[0], PROMPTS[3]]
            alone = [tokens(await collect(engine, ask(engine, p, max_tokens=12))) for p in newcomers]
            leaders = [PROMPTS[2], PROMPTS[4]]
            lead_alone = [tokens(await collect(engine, ask(engine, p, max_tokens=300))) for p in leaders]
            assert not adopted
            lead, running = [[], []], [asyncio.Event(), asyncio.Event()]

            async def leader(i):  # two long jobs decoding while the others come and go beside them (one finished
                # row beside two live ones is kept for a newcomer; beside one it would be compacted away). Long
                # enough to outlast them even when each arrival waits for a run of steps (run-ahead).
                async for event in engine.generate(ask(engine, leaders[i], max_tokens=300)):
                    lead[i].extend(event.token_ids)
                    if len(lead[i]) >= 10:
                        running[i].set()

            async def short_then_newcomers():
                await asyncio.gather(*(r.wait() for r in running))  # both leaders in the batch first
                await collect(engine, ask(engine, PROMPTS[4], max_tokens=3))  # its row then stays, finished
                got = []
                for p in newcomers:  # each takes the row the one before it left
                    got.append(tokens(await collect(engine, ask(engine, p, max_tokens=12))))
                return got

            together = await asyncio.gather(leader(0), leader(1), short_then_newcomers())
            return alone, together[2], lead_alone, lead

    alone, got, lead_alone, lead = run(main())
    assert got == alone and lead == lead_alone and list(map(len, lead)) == [300, 300]
    assert len(adopted) == 3 and len(set(adopted)) == 1  # each newcomer took the row its predecessor (first the
    # short job) left
