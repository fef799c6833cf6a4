"""The C causal attention for training (lifecycle/training/kernels.py): values and gradients against sdpa in
float64, every call it must not take handed back to sdpa, and a patched model that runs it."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama import modeling_llama

from lifecycle.training import fused, kernels

from test_fused_ops import tiny, train


def reference(q, k, v, scale=None):
    """sdpa in float64 on the repeated kv heads, its output in HF's (B, T, H, D) layout, and the gradients."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                         is_causal=True, scale=scale)
    return out.transpose(1, 2), (q, k, v)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("B, H, KV, T, D", [
    (2, 4, 2, 77, 32),    # grouped kv heads, T off every block size
    (1, 2, 2, 130, 64),   # past two 64-row blocks
    (1, 3, 1, 5, 16),     # fewer rows than a tile, one kv head for three
    (2, 2, 2, 40, 128),   # a head wider than one 64-float pass of the transposed product
    (1, 1, 1, 17, 48),    # three 16-float vectors
])
def test_values_and_gradients_equal_sdpa(B, H, KV, T, D):
    torch.manual_seed(0)
    # (B, T, H, D) storage seen as (B, H, T, D): the layout HF's projections hand over
    q, k, v = (torch.randn(B, T, h, D).transpose(1, 2).requires_grad_() for h in (H, KV, KV))
    out = kernels.CausalAttention.apply(q, k, v, D ** -0.5)
    expected, inputs = reference(q, k, v)
    assert out.shape == (B, T, H, D) and relative(out, expected) < 1e-5
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    for mine, ref in zip((q, k, v), inputs):
        assert mine.grad.shape == mine.shape and relative(mine.grad, ref.grad) < 1e-5


def test_the_scale_is_the_callers():
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    out = kernels.CausalAttention.apply(q, k, v, 0.3)
    assert relative(out, reference(q, k, v, scale=0.3)[0]) < 1e-5


def test_a_row_sees_no_later_key():
    """Changing the last position's key and value leaves every earlier output untouched."""
    q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
    before = kernels.CausalAttention.apply(q, k, v, 0.25)
    k[:, :, -1], v[:, :, -1] = 100.0, -100.0
    after = kernels.CausalAttention.apply(q, k, v, 0.25)
    assert torch.equal(before[:, :-1], after[:, :-1]) and not torch.equal(before[:, -1], after[:, -1])


class Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 1
    training = True


@pytest.mark.parametrize("change", [
    {"attention_mask": torch.zeros(1, 1, 8, 8, dtype=torch.bool)},
    {"dropout": 0.1},
    {"is_causal": False},
    {"sliding_window": 4},
    {"dtype": torch.bfloat16},
    {"head_dim": 24},
    {"keys": 12},  # a cache longer than the queries
])
def test_calls_it_does_not_compute_go_to_sdpa(change):
    calls = []

    def original(module, q, k, v, mask, **kwargs):
        calls.append(kwargs)
        return "sdpa", None

    change = dict(change)
    dtype, hd, keys = change.pop("dtype", torch.float32), change.pop("head_dim", 16), change.pop("keys", 8)
    mask = change.pop("attention_mask", None)
    q, k, v = torch.randn(1, 2, 8, hd, dtype=dtype), torch.randn(1, 2, keys, hd, dtype=dtype), torch.randn(
        1, 2, keys, hd, dtype=dtype)
    wrapped = kernels.attention_function(original)
    assert wrapped(Module(), q, k, v, mask, scaling=0.25, **change)[0] == "sdpa" and len(calls) == 1
    plain = torch.randn(1, 2, 8, 16)
    assert isinstance(wrapped(Module(), plain, plain, plain, None, scaling=0.25)[0], torch.Tensor)  # the kernel's


def test_a_patched_model_runs_the_kernel_and_hands_hfs_globals_back(monkeypatch):
    calls = []
    apply = kernels.CausalAttention.apply
    monkeypatch.setattr(kernels.CausalAttention, "apply", lambda *a: calls.append(a[0].shape) or apply(*a))
    torch.manual_seed(0)
    model = tiny()
    patched = copy.deepcopy(model)
    assert fused.patch(patched) is None
    expected, actual = train(model, 2), train(patched, 2)
    assert calls and all(shape[2] == 24 for shape in calls)
    assert actual[0] == pytest.approx(expected[0], rel=1e-6)
    for name, grad in expected[1][-1].items():
        assert relative(actual[1][-1][name], grad.double()) < 1e-5, name
    assert modeling_llama.ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None) is sdpa_attention_forward


def test_without_a_compiler_sdpa_runs_and_says_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("LIFECYCLE_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setattr(kernels, "_unavailable", None)
    q = torch.randn(1, 2, 8, 16)
    with caplog.at_level(logging.WARNING, logger="lifecycle.training.kernels"):
        out, _ = kernels.attention_function(sdpa_attention_forward)(Module(), q, q, q, None, scaling=0.25)
    assert "no-such-compiler" in caplog.text and "sdpa" in caplog.text
    assert relative(out, reference(q, q, q, 0.25)[0]) < 1e-5


def test_swiglu_kernel_equals_torch_and_odd_layouts_keep_torch(monkeypatch):
    torch.manual_seed(0)
    gate, up, grad = torch.randn(3, 7, 4099) * 4, torch.randn(3, 7, 4099), torch.randn(3, 7, 4099)  # ragged threads
    gate[0, 0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # silu's tails
    taken = []
    handles = kernels.swiglu_handles
    monkeypatch.setattr(kernels, "swiglu_handles", lambda g, u: taken.append(handles(g, u)) or taken[-1])
    for g, u in ((gate, up), (gate.transpose(0, 1), up.transpose(0, 1))):  # contiguous: C; transposed: torch
        g, u = g.clone().requires_grad_(), u.clone().requires_grad_()
        out = fused.SwiGLU.apply(g, u)
        out.backward(grad if g.is_contiguous() else grad.transpose(0, 1))
        expected_g, expected_u = (x.detach().double().requires_grad_() for x in (g, u))
        (F.silu(expected_g) * expected_u).backward(grad.double() if g.is_contiguous() else grad.transpose(0, 1).double())
        assert relative(out, (F.silu(expected_g) * expected_u).detach()) < 1e-6
        assert relative(g.grad, expected_g.grad) < 1e-6 and relative(u.grad, expected_u.grad) < 1e-6
    assert taken == [True, False]
