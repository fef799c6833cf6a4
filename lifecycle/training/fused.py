"""Fused training ops for Llama-layout models (llama, mistral, qwen2, qwen3): RMSNorm, rotary embedding, SwiGLU and
causal attention as autograd Functions with hand-written backward passes, patched onto a model's modules for
training.

HF's versions are chains of small elementwise ops, each a full pass over its tensor with a fresh allocation, and
autograd runs more of them backward (rotate_half alone is a neg, a cat and, backward, two zero-filled slices).
These compute the same formulas in fewer passes, in place on the buffers they create, and save only what their
backward reads (saved tensors are never overwritten, so retain_graph and gradcheck work). On float32 CPU tensors
SwiGLU and the causal attention run in C (kernels.py: one pass each way for SwiGLU; attention in 8-query tiles up to
the diagonal instead of torch's flash kernel); every call the C kernels do not take runs torch's ops or sdpa.
Forward values and gradients equal HF's to float rounding (tests/unit/test_fused_ops.py,
tests/unit/test_training_kernels.py); parameters, state_dict keys and save_pretrained are untouched: only instance
`forward`s change, and `unpatch` restores them. Tiny Llama, 2 CPU threads, one training step A/B in one process:
707 -> 666 ms median (the torch ops); then, on an AMD EPYC, ~980 -> ~930 ms with the C attention and 950 -> 935 ms
with the C SwiGLU.
"""
from __future__ import annotations

import functools
import logging
import sys
import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from lifecycle.training import kernels

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

log = logging.getLogger(__name__)


class RMSNorm(torch.autograd.Function):
    """weight * x * rsqrt(mean(x²) + eps) over the last dim (float32 x and weight)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # ‖x‖² / H: one reduction pass (HF: x.pow(2), then .mean(-1))
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        normed = x * rstd                                                                # (..., H)
        ctx.save_for_backward(normed, weight, rstd)
        return normed * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normed, weight, rstd = ctx.saved_tensors
        gn = grad * normed                                                               # (..., H)
        grad_weight = gn.sum(tuple(range(gn.dim() - 1))) if ctx.needs_input_grad[1] else None
        mean = torch.matmul(gn, weight).unsqueeze_(-1).div_(normed.shape[-1])            # (..., 1): mean(g·w·x̂)
        # dx = rstd · (g·w - x̂·mean(g·w·x̂)): one product, then in place
        grad_x = torch.mul(grad, weight).addcmul_(normed, mean, value=-1).mul_(rstd)
        return grad_x, grad_weight, None


class Rotary(torch.autograd.Function):
    """HF's apply_rotary_pos_emb (x·cos + rotate_half(x)·sin) for q and k in one node; cos/sin take no gradient."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return rotate(q, cos, sin, inverse=False), rotate(k, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor):
        cos, sin = ctx.saved_tensors  # the transpose of a rotation by θ is the rotation by -θ
        return rotate(grad_q, cos, sin, inverse=True), rotate(grad_k, cos, sin, inverse=True), None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin (or its transpose) in two passes: x·cos, then each half's sin term added in place.

    With x = [x1, x2], cos = [c1, c2], sin = [s1, s2]: forward [x1·c1 - x2·s1, x2·c2 + x1·s2];
    transpose [x1·c1 + x2·s2, x2·c2 - x1·s1].
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    s1, s2 = sin[..., :half], sin[..., half:]
    out = x * cos                                                                        # (B, heads, T, D)
    out[..., :half].addcmul_(x2, s2 if inverse else s1, value=1 if inverse else -1)
    out[..., half:].addcmul_(x1, s1 if inverse else s2, value=-1 if inverse else 1)
    return out


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up. On contiguous float32 CPU tensors the C kernels (kernels.py) take one pass each way and save
    only gate and up; otherwise torch, with silu's derivative computed into the buffer of grad·up (autograd: a third
    one)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.native = kernels.swiglu_handles(gate, up)
        if ctx.native:
            ctx.save_for_backward(gate, up)
            return kernels.swiglu_forward(gate, up)
        act = F.silu(gate)
        ctx.save_for_backward(gate, up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.native:
            return kernels.swiglu_backward(grad, *ctx.saved_tensors)
        gate, up, act = ctx.saved_tensors
        grad_act = grad * up
        grad_gate = torch.ops.aten.silu_backward.grad_input(grad_act, gate, grad_input=grad_act)
        return grad_gate, grad * act


# --- module forwards (bound per instance with functools.partial, so deepcopy and pickling keep working) ---

def rms_norm_forward(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != torch.float32 or module.weight.dtype != torch.float32:
        return type(module).forward(module, hidden_states)  # HF's casts round differently: keep them
    return RMSNorm.apply(hidden_states, module.weight, module.variance_epsilon)


def mlp_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = module.gate_proj(x), module.up_proj(x)
    if gate.dtype != up.dtype:
        return module.down_proj(module.act_fn(gate) * up)
    return module.down_proj(SwiGLU.apply(gate, up))


def attention_forward(module: torch.nn.Module, *args, **kwargs):
    with _fused_globals(sys.modules[type(module).__module__]):
        return type(module).forward(module, *args, **kwargs)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, *, original):
    """Drop-in for HF's function of the same name; `original` runs whatever this one does not handle."""
    if (unsqueeze_dim != 1 or cos.requires_grad or sin.requires_grad or q.shape[-1] % 2
            or {q.dtype, k.dtype, cos.dtype, sin.dtype} != {torch.float32} or q.shape[-1] != cos.shape[-1]):
        # (in bf16 HF rounds each product before the sum; addcmul_ would not: keep HF's rounding there)
        return original(q, k, cos, sin, unsqueeze_dim)
    return Rotary.apply(q, k, cos.unsqueeze(1), sin.unsqueeze(1))                       # cos: (B, 1, T, D)


class _AttentionFunctions:
    """Stands in for transformers' ALL_ATTENTION_FUNCTIONS: its sdpa function comes wrapped by the C kernel's
    (lifecycle/training/kernels.py, which hands every call it does not compute back to sdpa)."""

    def __init__(self, functions):
        self._functions = functions

    def get_interface(self, name, default):
        found = self._functions.get_interface(name, default)
        return kernels.attention_function(found) if name == "sdpa" else found

    def __getitem__(self, name):
        return self.get_interface(name, None) if name == "sdpa" else self._functions[name]

    def __getattr__(self, name):
        return getattr(self._functions, name)


_globals_lock = threading.Lock()
_globals_depth: dict[str, int] = {}
_globals_original: dict[str, tuple] = {}


@contextmanager
def _fused_globals(modeling):
    """The attention forward calls its modeling module's `apply_rotary_pos_emb` and `ALL_ATTENTION_FUNCTIONS` by
    global name, so there is no instance hook for rope or the attention kernel: both names are re-pointed at the
    fused versions for the duration of a patched attention's forward and restored after (reference-counted under a
    lock, so nested or concurrent patched forwards restore HF's exactly once). An unpatched model of the same family
    running in another thread in that window gets the fused versions, which compute the same values."""
    name = modeling.__name__
    with _globals_lock:
        if not _globals_depth.get(name):
            rope, functions = modeling.apply_rotary_pos_emb, getattr(modeling, "ALL_ATTENTION_FUNCTIONS", None)
            _globals_original[name] = (rope, functions)
            modeling.apply_rotary_pos_emb = functools.partial(apply_rotary_pos_emb, original=rope)
            if functions is not None:
                modeling.ALL_ATTENTION_FUNCTIONS = _AttentionFunctions(functions)
        _globals_depth[name] = _globals_depth.get(name, 0) + 1
    try:
        yield
    finally:
        with _globals_lock:
            _globals_depth[name] -= 1
            if not _globals_depth[name]:
                rope, functions = _globals_original.pop(name)
                modeling.apply_rotary_pos_emb = rope
                if functions is not None:
                    modeling.ALL_ATTENTION_FUNCTIONS = functions


# --- patching ---

@functools.cache
def _classes() -> dict[type, object]:
    """Each family's RMSNorm, MLP and attention class -> the instance forward that replaces its own."""
    import importlib

    forwards = {}
    for family in FAMILIES:
        modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
        forwards[getattr(modeling, f"{prefix}RMSNorm")] = rms_norm_forward
        forwards[getattr(modeling, f"{prefix}MLP")] = mlp_forward
        forwards[getattr(modeling, f"{prefix}Attention")] = attention_forward
    return forwards


def unsupported(model: torch.nn.Module) -> str | None:
    """Why the fused ops would not compute `model`'s own formulas; None when they do."""
    from transformers import PreTrainedModel

    # the transformers model itself, also inside a PEFT or bottleneck-adapter wrapper
    base = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    kind = getattr(getattr(base, "config", None), "model_type", None)
    if kind not in FAMILIES:
        return f"model type {kind!r} (fused ops know {', '.join(FAMILIES)})"
    config, decoder = base.config, base.base_model
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in (model, base, decoder)):
        return "a compiled model (inductor fuses these ops itself)"
    if config.hidden_act != "silu":
        return f"activation {config.hidden_act!r} (the fused MLP computes silu)"
    rotary = decoder.rotary_emb
    if rotary.rope_type != "default" or rotary.attention_scaling != 1.0:
        return f"rope type {rotary.rope_type!r} (only unscaled default rope)"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
        return "partial rotary embedding"  # (cos narrower than the head also falls back to HF's rope, per call)
    return None


def patch(model: torch.nn.Module) -> str | None:
    """Give `model`'s RMSNorm, MLP and attention modules the fused ops; returns why not (model unchanged) or None."""
    reason = unsupported(model)
    if reason:
        log.info("fused ops: off for %s", reason)
        return reason
    forwards, count = _classes(), 0
    for module in model.modules():
        forward = forwards.get(type(module))  # exact classes only: a subclass may compute something else
        if forward is mlp_forward and type(module.act_fn).__name__ not in ("SiLUActivation", "SiLU"):
            continue
        if forward is not None:
            module.forward = functools.partial(forward, module)
            count += 1
    log.info("fused ops: RMSNorm, rope, SwiGLU and causal attention on %d modules", count)
    return None


def unpatch(model: torch.nn.Module) -> None:
    """Restore the modules' own forwards."""
    forwards = set(_classes().values())
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func in forwards:
            del module.forward
