"""Packed prefill (lifecycle.serve.served.Packing): prompts of different lengths run as one sequence under a
block-diagonal causal mask give the logits, keys/values, positions and later decode steps of the left-padded prefill;
the cost rule that chooses it; the models it stays off for."""
from __future__ import annotations

import pytest
import torch
from serve_models import tokenizer  # noqa: F401
from test_serve_fastpath import random_model
from transformers import GPT2Config, GPT2LMHeadModel

from lifecycle.serve.served import Packing, ServedModel

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4], [20, 21, 22, 23, 24], [30], [40, 41, 42]]


def _both(served: ServedModel, all_logits: bool):
    """(packed, padded) prefills of PROMPTS on the same model."""
    packing = served.packing
    assert packing is not None and packing.pays([len(p) for p in PROMPTS])
    with torch.no_grad():
        packed = served.prefill("base", PROMPTS, all_logits)
        served.packing = None
        padded = served.prefill("base", PROMPTS, all_logits)
    served.packing = packing
    return packed, padded


@pytest.mark.parametrize("family", ["llama", "llama_gqa", "llama_biases", "qwen3", "mistral"])
@pytest.mark.parametrize("all_logits", [True, False], ids=["every-position", "last-only"])
def test_packed_prefill_equals_the_left_padded_one(family, all_logits, tokenizer):
    (logits, batch), (want_logits, want) = _both(ServedModel(random_model(family), tokenizer, "base"), all_logits)
    assert [tuple(x.shape) for x in logits] == [tuple(x.shape) for x in want_logits]
    assert max((a - b).abs().max().item() for a, b in zip(logits, want_logits)) < 1e-5
    assert batch.t == want.t and torch.equal(batch.valid, want.valid) and torch.equal(batch.positions, want.positions)
    for got_layer, want_layer in zip(batch.layers, want.layers):  # the columns in use (the room is unwritten)
        assert (got_layer.keys[:, :, :batch.t] - want_layer.keys[:, :, :batch.t]).abs().max() < 1e-5
        assert (got_layer.values[:, :, :batch.t] - want_layer.values[:, :, :batch.t]).abs().max() < 1e-5


def test_decode_steps_after_a_packed_prefill_equal_those_after_a_padded_one(tokenizer):
    served = ServedModel(random_model("llama_gqa"), tokenizer, "base", native=True)
    (logits, batch), (want_logits, want) = _both(served, False)
    tokens = [int(row[-1].argmax()) for row in logits]
    assert tokens == [int(row[-1].argmax()) for row in want_logits]
    with torch.no_grad():
        for _ in range(6):
            got, expected = served.decode("base", tokens, batch), served.decode("base", tokens, want)
            assert (got - expected).abs().max() < 1e-5
            tokens = got.argmax(-1).tolist()


def test_a_cross_prompt_mask_would_be_caught(tokenizer):
    """Negative control: run the packed ids under a plain causal mask (later prompts see earlier ones) and the
    comparison above fails."""
    served = ServedModel(random_model("llama"), tokenizer, "base")
    ids = torch.tensor([[t for p in PROMPTS for t in p]])
    positions = torch.cat([torch.arange(len(p)) for p in PROMPTS])[None]
    with torch.no_grad():
        leaky = served.lm(input_ids=ids, position_ids=positions).logits[0]
        _, (want_logits, _) = _both(served, True)
    last = leaky[sum(map(len, PROMPTS[:-1])):]
    assert (last - want_logits[-1]).abs().max() > 1e-3


def test_the_cost_rule(tokenizer):
    packing = Packing.of(random_model("llama"))
    assert not packing.pays([7])  # one prompt: nothing to pad
    assert not packing.pays([9, 9, 9])  # equal lengths: padding is free
    assert packing.pays([8, 64, 20, 33, 12, 50, 9, 40])  # the benchmark's kind: 236 tokens instead of 512
    assert not packing.pays([Packing.MAX_TOKENS, 1])  # past the mask's bound
    # a tiny model where attention pairs dominate: 8 prompts of ~500 tokens packed would attend over 4,084^2 pairs
    assert not packing.pays([512] * 7 + [500])


def test_models_outside_the_llama_layout_keep_left_padding(tokenizer):
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128)
    assert Packing.of(GPT2LMHeadModel(config).eval()) is None
    assert ServedModel(GPT2LMHeadModel(config).eval(), tokenizer, "base").packing is None
