"""Fused RMSNorm, rope and SwiGLU (lifecycle/training/fused.py): HF's values and gradients, gradcheck, patched models
training like unpatched copies, and the models the patch must leave alone."""
from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama import modeling_llama

from lifecycle.models.build import gpt2, llama
from lifecycle.training import fused
from lifecycle.training.module import CausalLM
from lifecycle.training.strategy import adapter, lora


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-6) -> None:
    """Equal within fp32 rounding, relative to the tensor's magnitude."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * expected.abs().max().item())


def value_and_grads(fn, inputs: list[torch.Tensor], grad_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, grad_outputs)
    return [o.detach() for o in outputs] + [x.grad for x in leaves]


def test_rms_norm_equals_hf():
    torch.manual_seed(0)
    x, weight, grad = torch.randn(3, 7, 48) * 3, torch.randn(48), torch.randn(3, 7, 48)

    def hf(x, w):  # HF's forward on a stand-in module whose weight is the leaf being differentiated
        return modeling_llama.LlamaRMSNorm.forward(SimpleNamespace(weight=w, variance_epsilon=1e-5), x)

    expected = value_and_grads(hf, [x, weight], [grad])
    actual = value_and_grads(lambda x, w: fused.RMSNorm.apply(x, w, 1e-5), [x, weight], [grad])
    for a, e in zip(actual, expected):
        close(a, e)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_rotary_equals_hf_on_the_attention_layout(kv_heads):
    torch.manual_seed(0)
    config = modeling_llama.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=kv_heads)
    cos, sin = modeling_llama.LlamaRotaryEmbedding(config)(torch.randn(1), torch.arange(5, 14)[None].expand(2, -1))
    # (B, T, heads, D) projections viewed as (B, heads, T, D), as the attention forward passes them
    q, k = torch.randn(2, 9, 4, 16).transpose(1, 2), torch.randn(2, 9, kv_heads, 16).transpose(1, 2)
    grads = [torch.randn(2, 4, 9, 16), torch.randn(2, kv_heads, 9, 16)]
    expected = value_and_grads(lambda q, k: modeling_llama.apply_rotary_pos_emb(q, k, cos, sin), [q, k], grads)
    actual = value_and_grads(lambda q, k: fused.apply_rotary_pos_emb(
        q, k, cos, sin, original=modeling_llama.apply_rotary_pos_emb), [q, k], grads)
    for a, e in zip(actual, expected):
        close(a, e)


def test_rotary_equals_hf_for_any_cos_and_sin():
    """Unequal halves: the formula is rotate_half's, not only the default rope's."""
    torch.manual_seed(0)
    q, k, cos, sin = torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    grads = [torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8)]
    expected = value_and_grads(lambda q, k: modeling_llama.apply_rotary_pos_emb(q, k, cos, sin), [q, k], grads)
    actual = value_and_grads(lambda q, k: fused.Rotary.apply(q, k, cos[:, None], sin[:, None]), [q, k], grads)
    for a, e in zip(actual, expected):
        close(a, e)


def test_rotary_keeps_hf_rounding_outside_float32():
    q, k, cos, sin = (torch.randn(2, 3, 5, 8, dtype=torch.bfloat16) for _ in range(4))
    cos, sin = cos[:, 0], sin[:, 0]
    expected = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    actual = fused.apply_rotary_pos_emb(q, k, cos, sin, original=modeling_llama.apply_rotary_pos_emb)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))


def test_swiglu_equals_hf():
    torch.manual_seed(0)
    gate, up, grad = torch.randn(3, 7, 40) * 3, torch.randn(3, 7, 40), torch.randn(3, 7, 40)
    expected = value_and_grads(lambda g, u: F.silu(g) * u, [gate, up], [grad])
    actual = value_and_grads(fused.SwiGLU.apply, [gate, up], [grad])
    for a, e in zip(actual, expected):
        close(a, e)


def test_gradcheck_in_float64():
    torch.manual_seed(0)
    f64 = functools.partial(torch.randn, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: fused.RMSNorm.apply(x, w, 1e-6), (f64(2, 3, 8), f64(8)))
    cos, sin = torch.randn(2, 1, 5, 8, dtype=torch.float64), torch.randn(2, 1, 5, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k: fused.Rotary.apply(q, k, cos, sin), (f64(2, 3, 5, 8), f64(2, 1, 5, 8)))
    assert torch.autograd.gradcheck(fused.SwiGLU.apply, (f64(2, 3, 8), f64(2, 3, 8)))


def tiny(model_type: str = "llama", **overrides):
    if model_type == "llama" and not overrides:  # the builder pretraining uses
        return llama(64, 2, 4, 2, 128, 256, 1e4, 0.0, True, vocab_size=300, bos_token_id=0, eos_token_id=0,
                     pad_token_id=1)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        model_type, vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, **overrides))


def train(model: torch.nn.Module, steps: int = 3) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """Losses and gradients of a few SGD steps on fixed random batches (Adam's g/√v would turn a rounding-level
    difference in a near-zero gradient into a full step)."""
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses, grads = [], []
    for _ in range(steps):
        ids = torch.randint(0, 300, (2, 24), generator=generator)
        optimizer.zero_grad()
        value = model(input_ids=ids, labels=ids).loss
        value.backward()
        optimizer.step()
        losses.append(value.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return losses, grads


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_a_patched_model_trains_like_an_unpatched_copy(model_type):
    torch.manual_seed(0)
    model = tiny(model_type)
    patched = copy.deepcopy(model)
    keys = list(patched.state_dict())
    assert fused.patch(patched) is None
    assert "forward" in patched.model.norm.__dict__ and "forward" in patched.model.layers[0].mlp.__dict__
    assert list(patched.state_dict()) == keys  # checkpoints and save_pretrained see the same tensors
    expected, actual = train(model), train(patched)
    assert actual[0] == pytest.approx(expected[0], rel=1e-6)
    for step_expected, step_actual in zip(expected[1], actual[1]):
        assert step_actual.keys() == step_expected.keys()
        for name, grad in step_expected.items():
            close(step_actual[name], grad, rel=1e-5)
    assert modeling_llama.apply_rotary_pos_emb.__module__ == modeling_llama.__name__  # HF's own again after forward
    fused.unpatch(patched)
    assert not any("forward" in m.__dict__ for m in patched.modules())


@pytest.mark.parametrize("strategy", [lora(4, 8, 0.0, "all-linear", "default", 1e-3),
                                      adapter(8, "gelu", 0.0, ["o_proj", "down_proj"], 1.0, "default", 1e-3)])
def test_an_adapter_model_is_patched_and_trains_like_an_unpatched_copy(strategy):
    torch.manual_seed(0)
    model = strategy(tiny())
    patched = copy.deepcopy(model)
    assert fused.patch(patched) is None
    assert sum("forward" in m.__dict__ for m in patched.modules()) == 9  # 5 norms, 2 MLPs, 2 attentions
    expected, actual = train(model, 2), train(patched, 2)
    assert actual[0] == pytest.approx(expected[0], rel=1e-6)
    assert 0 < len(expected[1][-1]) < len(list(model.parameters()))  # the adapter's parameters only
    for name, grad in expected[1][-1].items():
        close(actual[1][-1][name], grad, rel=1e-5)


@pytest.mark.parametrize("build, reason", [
    (lambda: tiny("llama", hidden_act="gelu"), "activation 'gelu'"),
    (lambda: tiny("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope type"),
    (lambda: tiny("qwen3", partial_rotary_factor=0.5), "partial rotary"),
    (lambda: gpt2(64, 2, 4, 256, 0.0, True, vocab_size=300, bos_token_id=0, eos_token_id=0), "model type 'gpt2'"),
    (lambda: compiled(tiny()), "compiled"),
])
def test_unsupported_models_are_left_unchanged(build, reason):
    model = build()
    assert reason in fused.patch(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    model.compile()  # compiles at the first call, so nothing is compiled here
    return model


def test_causal_lm_patches_for_fit_only_and_never_the_teacher():
    model, teacher = tiny(), tiny()
    module = CausalLM(model, None, None, teacher=teacher)
    module.trainer = SimpleNamespace(strategy=None)
    module.on_fit_start()
    assert "forward" in model.model.norm.__dict__
    assert not any("forward" in m.__dict__ for m in teacher.modules())
    module.teardown("fit")
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not CausalLM(tiny(), None, None, compile=True).fused_ops
    assert not CausalLM(tiny(), None, None, fused_ops=False).fused_ops
