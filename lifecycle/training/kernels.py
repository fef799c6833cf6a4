"""Training kernels for the CPU in C (kernels.c): causal self-attention and SwiGLU, forward and backward, float32.

Attention: torch's CPU flash kernel splits the work into 64-query x 256-key blocks and calls a small GEMM per block:
on the 11M default Llama (8 x 256 tokens, 5 heads of 64) one layer's attention takes 17.4 ms forward and backward on
a 2-core AMD EPYC, ~60 GFLOP/s. kernels.c takes each 8-query tile against all the keys up to its diagonal in one
register-blocked pass and recomputes the probabilities in backward from the saved log-sum-exp: 9.7 ms.
`attention_function(original)` wraps transformers' sdpa attention function: calls this kernel handles (float32 CPU
tensors outside autocast, causal with no mask or padding, no dropout, no cache, no sliding window shorter than the
sequence, head_dim a multiple of 16) go to the kernel, every other call to `original`.

SwiGLU: silu(gate) * up in one pass and its backward in one (torch: two and three passes, and the saved silu(gate));
fused.SwiGLU calls it for contiguous float32 CPU tensors.

Values and gradients equal torch's to float rounding (tests/unit/test_training_kernels.py). The C file is compiled
on first use like the serving step (lifecycle/serve/native.py: `$CC`, cached in `$LIFECYCLE_NATIVE_CACHE`); without
a compiler the torch versions run and the reason is logged once.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import threading
from pathlib import Path

import torch

from lifecycle.serve import native

SOURCE = Path(__file__).with_name("kernels.c")

log = logging.getLogger(__name__)
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_unavailable: str | None = None


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (once logged) where it cannot be built here."""
    global _library, _unavailable
    with _lock:
        if _library is None and _unavailable is None:
            try:
                lib = ctypes.CDLL(str(native.build(SOURCE)))
            except (native.NativeUnavailable, OSError) as e:
                _unavailable = str(e)
                log.warning("training kernels: torch's sdpa and SwiGLU (the C kernels are unavailable: %s)", e)
                return None
            p, i64 = ctypes.c_void_p, ctypes.c_int64
            head = [i64, i64, i64, i64, ctypes.c_int, ctypes.c_float]
            lib.lc_attention_forward.argtypes = head + [p, p] * 4 + [p, ctypes.c_int]
            lib.lc_attention_backward.argtypes = head + [p, p] * 5 + [p] + [p, p] * 3 + [ctypes.c_int]
            lib.lc_attention_forward.restype = lib.lc_attention_backward.restype = ctypes.c_int
            lib.lc_swiglu_forward.argtypes = [p, p, p, i64, ctypes.c_int]
            lib.lc_swiglu_backward.argtypes = [p, p, p, p, p, i64, ctypes.c_int]
            lib.lc_swiglu_forward.restype = lib.lc_swiglu_backward.restype = None
            _library = lib
        return _library


def _strides(x: torch.Tensor):
    return (ctypes.c_int64 * 3)(*x.stride()[:3])


def _check(code: int, what: str) -> None:
    if code:
        raise RuntimeError(f"training kernels: the C {what} failed ({'out of memory' if code == 2 else code})")


class CausalAttention(torch.autograd.Function):
    """softmax(q kᵀ · scale, causal) v for q (B, H, T, D) and k, v (B, H_kv, T, D); returns (B, T, H, D)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        lib = library()
        B, H, T, D = q.shape
        out = q.new_empty(B, T, H, D)                                                    # HF's layout after sdpa
        lse = q.new_empty(B, H, T)
        o = out.transpose(1, 2)
        _check(lib.lc_attention_forward(B, H, k.shape[1], T, D, scale, q.data_ptr(), _strides(q), k.data_ptr(),
                                        _strides(k), v.data_ptr(), _strides(v), o.data_ptr(), _strides(o),
                                        lse.data_ptr(), torch.get_num_threads()), "forward")
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        o, do = out.transpose(1, 2), grad.transpose(1, 2)
        # gradients in their inputs' layouts, so the views they flow back through need no copy
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _check(library().lc_attention_backward(
            B, H, k.shape[1], T, D, ctx.scale, q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(),
            _strides(v), o.data_ptr(), _strides(o), do.data_ptr(), _strides(do), lse.data_ptr(), dq.data_ptr(),
            _strides(dq), dk.data_ptr(), _strides(dk), dv.data_ptr(), _strides(dv), torch.get_num_threads()),
            "backward")
        return dq, dk, dv, None


def handles(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, dropout: float,
            kwargs: dict) -> bool:
    """Whether the C kernel computes what sdpa would for this call (causal over the whole sequence)."""
    tensors = (query, key, value)
    causal = kwargs.get("is_causal")
    if not (causal if causal is not None else getattr(module, "is_causal", True)):
        return False
    if attention_mask is not None or dropout or kwargs.get("cu_seq_lens_q") is not None:
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 4 or t.stride(-1) != 1 for t in tensors):
        return False
    B, H, T, D = query.shape
    window = kwargs.get("sliding_window")
    return (T > 1 and key.shape[2] == T and value.shape == key.shape and key.shape[0] == B and H % key.shape[1] == 0
            and D % 16 == 0 and (window is None or window >= T) and not torch.is_autocast_enabled("cpu")
            and library() is not None)


@functools.cache
def attention_function(original):
    """transformers' attention-function signature: the C kernel where `handles`, else `original` (sdpa)."""

    @functools.wraps(original)
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs):
        if not handles(module, query, key, value, attention_mask, dropout, kwargs):
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return CausalAttention.apply(query, key, value, float(scale)), None

    return attention


def swiglu_handles(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether the C SwiGLU takes these: float32 CPU tensors of one shape, both contiguous, outside autocast."""
    return (gate.device.type == up.device.type == "cpu" and gate.dtype == up.dtype == torch.float32
            and gate.shape == up.shape and gate.is_contiguous() and up.is_contiguous()
            and not torch.is_autocast_enabled("cpu") and library() is not None)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate)
    library().lc_swiglu_forward(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), torch.get_num_threads())
    return out


def swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad = grad.contiguous()
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    library().lc_swiglu_backward(grad.data_ptr(), gate.data_ptr(), up.data_ptr(), d_gate.data_ptr(), d_up.data_ptr(),
                                 gate.numel(), torch.get_num_threads())
    return d_gate, d_up
