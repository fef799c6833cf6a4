"""The C step's prefill (lc_prefill through ServedModel.prefill) against the HF forward: each prompt's last logits, its
keys and values in its left-padded row, and the decode steps after it, per family, with 1 and 2 threads; int8 against
the float32 model holding its dequantized weights; rope growth, bad ids, and when the HF forward keeps the prefill."""
from __future__ import annotations

import copy

import pytest
import torch
from serve_models import tokenizer  # noqa: F401
from test_serve_fastpath import DIMS, FAMILIES, random_model
from test_serve_native import threads  # noqa: F401
from transformers import LlamaConfig, LlamaForCausalLM

from lifecycle.serve import native
from lifecycle.serve.batch import Batch
from lifecycle.serve.served import NATIVE_PREFILL_INT8_FLOPS, ServedModel

FLOAT_FAMILIES = [f for f in FAMILIES if f != "llama_int8"]
PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [11], [8, 8, 19, 250, 61, 3, 3, 90, 14, 200, 6]]


def _hf(model, prompt: list[int]):
    """The HF forward over one prompt alone: last logits (V,), keys and values per layer (kv_heads, L, head_dim)."""
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
    return out.logits[0, -1], [(layer.keys[0], layer.values[0]) for layer in out.past_key_values.layers]


def _decode(served: ServedModel, batch: Batch, feed: list[int], steps: int) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = served.decode("base", feed, batch)
            out.append(logits)
            feed = logits.argmax(-1).tolist()
    return out


def _compare(served: ServedModel, reference, tolerance: float, prompts=PROMPTS) -> None:
    with torch.no_grad():
        logits, batch = served.prefill("base", prompts, all_logits=False)
    assert isinstance(batch, Batch) and batch.t == max(map(len, prompts))
    width = batch.t
    for row, prompt in enumerate(prompts):
        want_logits, want_cache = _hf(reference, prompt)
        assert (logits[row][0] - want_logits).abs().max().item() < tolerance
        for layer, (keys, values) in zip(batch.layers, want_cache):
            n = len(prompt)
            assert (layer.keys[row, :, width - n:width] - keys).abs().max().item() < tolerance
            assert (layer.values[row, :, width - n:width] - values).abs().max().item() < tolerance
            assert not layer.keys[row, :, :width - n].any()  # padding untouched
    assert batch.valid[:, :width].sum(1).tolist() == [len(p) for p in prompts]
    # decode on from it as from the HF forward's left-padded prefill
    slow = ServedModel(copy.deepcopy(reference), served.tokenizer, "base", fast_decode=False)
    with torch.no_grad():
        hf_batch = slow.prefill("base", prompts, all_logits=False)[1]
    feed = [3 + row for row in range(len(prompts))]
    got, want = _decode(served, batch, feed, 5), _decode(slow, hf_batch, feed, 5)
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) < tolerance


def _native(model, tokenizer) -> ServedModel:
    served = ServedModel(model, tokenizer, "base", native=True)
    assert served.fast.native is not None and max(map(len, PROMPTS)) <= served.native_prefill[0]
    return served


@pytest.mark.parametrize("family", FLOAT_FAMILIES)
def test_prefill_equals_the_hf_forward(family, tokenizer, threads):
    _compare(_native(random_model(family), tokenizer), random_model(family), 1e-5)


def test_many_tokens_sweep_each_panel_in_groups_of_rows(tokenizer, threads):
    # 72 prompt tokens: 9 groups of 8 rows over each panel; gate/up's 1,100 columns end in a part-filled panel
    def model():
        torch.manual_seed(0)
        config = LlamaConfig(**{**DIMS, "hidden_size": 256, "intermediate_size": 1100, "num_key_value_heads": 2})
        return LlamaForCausalLM(config).eval()
    prompts = [list(range(5, 45)), [7, 9, 11], [(13 * i) % 300 + 2 for i in range(29)]]  # 72 tokens
    _compare(_native(model(), tokenizer), model(), 1e-4, prompts)


def test_int8_prefill_equals_its_dequantized_float32_model(tokenizer, threads):
    # weight-only int8, the decode steps' arithmetic (torch.ao's forward quantizes activations too); int8 models
    # prefill in C only up to NATIVE_PREFILL_INT8_FLOPS, which these prompts are far below
    quantized, dequantized = random_model("llama_int8"), random_model("llama_gqa")
    with torch.no_grad():
        for name, param in quantized.named_parameters():
            dequantized.get_parameter(name).copy_(param)
        for name, module in quantized.named_modules():
            if hasattr(module, "weight") and callable(module.weight):
                dequantized.get_submodule(name).weight.copy_(module.weight().dequantize())
    served = _native(quantized, tokenizer)
    assert served.native_prefill[2] == NATIVE_PREFILL_INT8_FLOPS
    assert _native(random_model("llama_gqa"), tokenizer).native_prefill[2] == float("inf")
    _compare(served, dequantized, 1e-4)


def test_a_wrong_rope_table_fails_the_comparison(tokenizer):
    served = _native(random_model("llama_gqa"), tokenizer)
    served.fast.native.sin.mul_(-1)
    with pytest.raises(AssertionError):
        _compare(served, random_model("llama_gqa"), 1e-3)


def test_prompts_past_the_rope_table_grow_it(tokenizer):
    served = _native(random_model("llama"), tokenizer)
    served.fast.native._tables(4)  # the longest prompt reaches position 10
    _compare(served, random_model("llama"), 1e-5)
    assert served.fast.native.model.max_pos >= 11


def test_a_token_id_outside_the_embedding_is_refused(tokenizer):
    served = _native(random_model("llama"), tokenizer)
    with pytest.raises(ValueError, match="outside the embedding's 320 rows"):
        served.prefill("base", [[3, 4], [5, 320, 6]], all_logits=False)


def test_the_hf_forward_keeps_long_or_many_prompts_and_prompt_logprobs(tokenizer, monkeypatch):
    served = _native(random_model("llama"), tokenizer)
    calls = []
    monkeypatch.setattr(native.NativeStep, "prefill", lambda self, *a: calls.append(a) or 1 / 0)
    longest, total = max(map(len, PROMPTS)), sum(map(len, PROMPTS))
    with torch.no_grad():
        logits, _ = served.prefill("base", PROMPTS, all_logits=True)  # every position's logits: the HF forward
        assert [len(row) for row in logits] == [len(p) for p in PROMPTS]
        flops = total * served.layer_flops
        for limits in [(longest - 1, total, flops), (longest, total - 1, flops), (longest, total, 0.99 * flops)]:
            served.native_prefill = limits  # one token (or a few FLOPs) over one limit
            served.prefill("base", PROMPTS, all_logits=False)
        assert not calls
        served.native_prefill = (longest, total, flops)
        with pytest.raises(ZeroDivisionError):
            served.prefill("base", PROMPTS, all_logits=False)
    assert len(calls) == 1
