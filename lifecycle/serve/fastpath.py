"""A hand-written decode step for Llama-layout models (llama, mistral, qwen2, qwen3): the HF forward's arithmetic
without its per-call overhead (module calls, mask and rotary modules, cache plumbing), for every row of a `Batch`.

On the tiny default model a decode step is mostly Python and op overhead, so fewer, larger ops are the speed-up: q/k/v
and gate/up run as one matmul each, rope is computed once per step for all layers and rotates q and k together, and
grouped-query attention runs on the kv heads as HF's sdpa does for one query token. Keys and values go to the batch's
own storage at column `t`, so a prefill by the HF forward, a decode step here and `batch.merge` interoperate.

Memory: the fused q/k/v and gate/up matrices are made once by concatenating the modules' weights; each module's weight
is then re-pointed at its rows of the fused matrix, so no weight is held twice and the HF forward (prefill, adapters)
reads the same numbers. A later `param.data = ...` (e.g. `model.to(dtype)`) would leave the fused copy stale:
`stale()` sees that and the caller rebuilds.

Layout: float32 weights on the CPU are stored transposed, (in, out) contiguous, and every module's weight becomes a
transposed view of that storage (same shape, other strides), so `x @ W.T` is MKL's "no transpose" product: at
batch 1 it streams the weights ~11% faster, at batch 8 ~27% (2 threads; 11M and 120M Llama shapes). The sums then
run in another order than over the row-major weights, so logits agree with an untouched model's to float rounding
rather than bit for bit. The tied input embedding reads its rows through the same view.

Compiled (`compile=True`, deploy.engine.compile): the same step through torch.compile (dynamic shapes, inductor's
C++ wrapper), attending over the batch's whole preallocated capacity with its additive mask (spare columns are zeros
and masked) and writing the new key/value with index_copy_ at a column given as a tensor, so neither a new column nor
a capacity growth recompiles it. Compiled once for one row and once for several (torch specialises size 1) when the
decoder is built (engine start-up with it: 48-73 s for the 11M Llama, 224 s for a 120M one on 2 CPU cores), then 1.5x
the eager step on the 11M Llama, 1.1x on the 120M one. Not for int8 modules (the eager step serves them).

Native (`native=True` or "auto", deploy.engine.native, on by default in the engine): the same step in C
(lifecycle.serve.native), float32 and int8, on the CPU; it packs its own copy of the weights (in panels of 32
columns) from the ones prepared here. It replaces the torch step (and makes compiling it pointless: compile is
skipped) wherever it builds and applies.

int8 variants (torch.ao dynamic quantized Linear) are served too: their Linear modules are called as modules (no
fusion: each packs its own weights), the rest of the step is the same; the native step decodes them weight-only.
Biases (qwen2's q/k/v, llama's attention_bias and mlp_bias) are fused with their weights. Anything else is refused
(build returns None, `unsupported` says why).
"""
from __future__ import annotations

import itertools
import logging
import time
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lifecycle.serve import hugepages

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

log = logging.getLogger(__name__)


def build(model, compile: bool = False, native: bool | str = False) -> FastDecoder | None:
    """The fast decode step for `model`, or None where `unsupported(model)` gives a reason (logged either way)."""
    reason = unsupported(model)
    if reason:
        log.info("decode: the HF forward (no fast path for %s)", reason)
        return None
    log.info("decode: the fast path (%s, %d layers); adapters use the HF forward", model.config.model_type,
             model.config.num_hidden_layers)
    return FastDecoder(model, compile, native)


def _transposed_bytes(model) -> int:
    """Bytes of the float matrices FastDecoder stores transposed: fused q/k/v, o, fused gate/up, down, the head."""
    def size(linears) -> int:  # as _fuse and _single decide; int8 modules keep their own packed weights
        if any(type(linear) is not nn.Linear for linear in linears):
            return 0
        if len(linears) == 1 and not linears[0].weight.is_contiguous():
            return 0
        return hugepages.padded(sum(linear.weight.numel() * linear.weight.element_size() for linear in linears))
    return sum(size(group) for group in projection_groups(model))


def projection_groups(model) -> list[list[nn.Module]]:
    """The projections as the fast path fuses them: the head, then per layer q/k/v, o, gate/up and down."""
    groups = [[model.lm_head]]
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        groups += [[a.q_proj, a.k_proj, a.v_proj], [a.o_proj], [m.gate_proj, m.up_proj], [m.down_proj]]
    return groups


def unsupported(model) -> str | None:
    """Why the fast path cannot run `model` exactly as its HF forward does; None when it can."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        return f"model type {kind!r} (the fast path knows {', '.join(FAMILIES)})"
    if getattr(model, "_compiled_call_impl", None) is not None:
        return "a compiled variant: its compiled HF forward is kept"
    if config.hidden_act != "silu":
        return f"activation {config.hidden_act!r} (the fast path computes silu)"
    rotary = model.model.rotary_emb
    if rotary.rope_type != "default" or rotary.attention_scaling != 1.0:
        return f"rope type {rotary.rope_type!r} (only unscaled rope)"
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embedding"
    window = getattr(config, "sliding_window", None)
    sliding = kind == "mistral" or "sliding_attention" in (getattr(config, "layer_types", None) or ())
    if sliding and window is not None and window < config.max_position_embeddings:
        return f"sliding-window attention ({window} < {config.max_position_embeddings} positions)"
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        if not _linears_of_one_kind([a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]):
            return f"layer projections of type {type(a.q_proj).__name__} (only nn.Linear or torch.ao int8 Linear)"
        for fused in ([a.q_proj, a.k_proj, a.v_proj], [m.gate_proj, m.up_proj]):
            if len({getattr(linear, "bias", None) is None for linear in fused}) > 1:
                return "a bias on some but not all of q/k/v (or gate/up)"
    if not _linears_of_one_kind([model.lm_head]):
        return f"an lm_head of type {type(model.lm_head).__name__}"
    return None


class FastDecoder:
    """One decode step for all rows of a batch; built once per loaded model."""

    def __init__(self, model, compile: bool = False, native: bool | str = False):
        config, first = model.config, model.model.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, \
            first.head_dim
        self.scale = first.scaling
        self.embed = model.model.embed_tokens.weight
        self.inv_freq = model.model.rotary_emb.inv_freq  # (head_dim / 2,) float32
        self.dtype = self.embed.dtype
        self.eps = config.rms_norm_eps
        self.final_norm = model.model.norm.weight
        # float32 on the CPU: weights stored transposed (see the module docstring)
        self.transpose = self.dtype == torch.float32 and self.embed.device.type == "cpu"
        self.fused: list[tuple[nn.Parameter, torch.Tensor]] = []  # (module weight, the view it must still be)
        # the transposed copies live in huge pages where the system has them (lifecycle.serve.hugepages)
        self.arena = hugepages.Arena(_transposed_bytes(model)) if self.transpose else None
        self.int8 = type(model.lm_head) is not nn.Linear
        self.head = self._single(model.lm_head)
        self.head_tensors = _tensors(self.head)
        self.layers = [self._layer(layer, config.intermediate_size) for layer in model.model.layers]
        if self.transpose:
            self._release_checkpoint(model)
        self.compiled = None
        self.native = None
        if native:
            self.native = self._native(model, native)
        if compile and self.native is not None:
            log.info("decode: compile skipped (the native step serves this model)")
        elif compile:
            if type(model.lm_head) is not nn.Linear or type(model.model.layers[0].mlp.down_proj) is not nn.Linear:
                log.info("decode: compile skipped (int8 modules); the eager fast path serves this model")
            else:
                self._compile()

    def _release_checkpoint(self, model) -> None:
        """Copy what the fusion left in place (embeddings, norms, a single projection's bias) too. A checkpoint is
        loaded as views of its memory-mapped file; the copies above read every page of it, and the whole mapping
        stays resident while any tensor still views it: a 120M Llama's process held 1,305 MB after this init, the
        file's 456 MB included, and 849 MB once nothing viewed it."""
        fused = {id(param) for param, _ in self.fused}
        with torch.no_grad():
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                if id(tensor) not in fused and tensor.device.type == "cpu":
                    tensor.data = tensor.data.clone()

    def _native(self, model, mode: bool | str):
        """The C step (lifecycle.serve.native), or None where it cannot run and mode is "auto" (logged why)."""
        from lifecycle.serve import native

        reason = native.unsupported(self)
        if reason is None:
            try:
                step = native.NativeStep(self, model)
                log.info("decode: the native step (C, %s)", "int8 weights" if self.int8 else "float32")
                return step
            except native.NativeUnavailable as e:
                reason = str(e)
        if mode == "auto":
            log.warning("decode: the native step is off (%s); the torch fast path serves", reason)
            return None
        raise native.NativeUnavailable(f"deploy.engine.native=true but {reason}; set deploy.engine.native=auto "
                                       "(or false) to serve with the torch fast path")

    def _compile(self) -> None:
        """torch.compile the whole-capacity step and compile it now for one row and for two, on scratch caches."""
        started = time.perf_counter()
        self.compiled = torch.compile(self._capacity_step, dynamic=True, fullgraph=True,
                                      options={"cpp_wrapper": True})
        device = self.embed.device
        # No "duck" sizes: a scratch capacity equal to head_dim (or 2 rows to 2 kv heads) would otherwise become a
        # guard that the next real batch fails, and a ~20 s recompile in the middle of serving.
        from torch.fx.experimental import _config as fx_config
        with fx_config.patch(use_duck_shape=False):
            self._warm_up(device)
        log.info("decode: the fast path compiled in %.1f s", time.perf_counter() - started)

    def _warm_up(self, device: torch.device) -> None:
        from lifecycle.serve.batch import GROW, Batch

        for rows in (1, 2):
            shape = (rows, self.kv_heads, GROW, self.head_dim)
            caches = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(2 * len(self.layers))]
            scratch = Batch(caches[::2], caches[1::2], torch.zeros(rows, GROW, dtype=torch.bool, device=device),
                            torch.zeros(rows, dtype=torch.long, device=device), 0)
            with torch.no_grad():
                positions, mask = scratch.step_inputs(self.dtype)
                self(torch.zeros(rows, dtype=torch.long, device=device), positions[:, 0], mask, scratch)

    def _layer(self, layer, intermediate: int) -> dict:
        a, m = layer.self_attn, layer.mlp
        q_norm = getattr(a, "q_norm", None)
        spec = {"norm1": layer.input_layernorm.weight, "norm2": layer.post_attention_layernorm.weight,
                "qkv": self._fuse([a.q_proj, a.k_proj, a.v_proj]), "o": self._single(a.o_proj),
                "gate_up": self._fuse([m.gate_proj, m.up_proj]), "down": self._single(m.down_proj),
                "split": intermediate,
                "q_norm": None if q_norm is None else q_norm.weight,
                "k_norm": None if q_norm is None else a.k_norm.weight}
        spec["tensors"] = {name: _tensors(spec[name]) for name in ("qkv", "o", "gate_up", "down")}
        return spec

    def _fuse(self, linears: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
        """One call computing all of `linears` on the same input, their outputs side by side on the last dim."""
        if type(linears[0]) is not nn.Linear:  # int8: each module packs its own weights
            return lambda x: torch.cat([linear(x) for linear in linears], -1)
        if self.transpose:  # (in_features, sum of out_features) contiguous, used through its transpose
            storage = self.arena.take((linears[0].in_features, sum(linear.out_features for linear in linears)),
                                      self.dtype)
            weight = torch.cat([linear.weight.detach().t() for linear in linears], 1, out=storage).t()
        else:
            weight = torch.cat([linear.weight.detach() for linear in linears])  # (sum of out_features, in_features)
        biases = [linear.bias for linear in linears]
        bias = torch.cat([b.detach() for b in biases]) if biases[0] is not None else None
        start = 0
        for linear in linears:  # each module now reads its rows of the fused matrix: one copy in memory
            rows = slice(start, start + linear.out_features)
            linear.weight.data = weight[rows]
            self.fused.append((linear.weight, linear.weight.data))
            if bias is not None:
                linear.bias.data = bias[rows]
                self.fused.append((linear.bias, linear.bias.data))
            start = rows.stop
        return partial(F.linear, weight=weight, bias=bias)

    def _single(self, linear: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        if type(linear) is not nn.Linear:  # int8: the module packs its own weights
            return linear
        if self.transpose and linear.weight.is_contiguous():
            storage = self.arena.take((linear.in_features, linear.out_features), self.dtype)
            linear.weight.data = storage.copy_(linear.weight.detach().t()).t()
            self.fused.append((linear.weight, linear.weight.data))
        return partial(F.linear, weight=linear.weight, bias=linear.bias)  # the live parameters

    def stale(self) -> bool:
        """Whether a module's weight was replaced since the fusion (its fused copy no longer reads the same)."""
        return any(param.data_ptr() != view.data_ptr() for param, view in self.fused)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, batch) -> torch.Tensor:
        """Logits (rows, V) after feeding ids (rows,) at positions (rows,), mask (rows, 1, 1, t + 1) from
        batch.step_inputs; keys and values go to the batch's column t."""
        if self.native is not None:
            return self.native(ids, positions, batch)
        keys, values = [cache.keys for cache in batch.layers], [cache.values for cache in batch.layers]
        if self.compiled is not None:
            column = torch.tensor([batch.t], device=ids.device)
            return self.compiled(ids, positions, batch.bias[:, None, None, :], column, keys, values)
        t = batch.t

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys[i].select(2, t).copy_(k)
            values[i].select(2, t).copy_(v)
            return F.scaled_dot_product_attention(q, keys[i].narrow(2, 0, t + 1), values[i].narrow(2, 0, t + 1),
                                                  attn_mask=mask, scale=self.scale)
        return self._forward(ids, positions, attend)

    def _capacity_step(self, ids: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor, column: torch.Tensor,
                       keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """The step torch.compile sees: attention over every preallocated column under the additive `bias`
        (rows, 1, 1, capacity), the new keys and values written at `column` (1,), a tensor, so no shape or value
        here changes from one step to the next."""
        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys[i].index_copy_(2, column, k[:, :, None])
            values[i].index_copy_(2, column, v[:, :, None])
            return F.scaled_dot_product_attention(q, keys[i], values[i], attn_mask=bias, scale=self.scale)
        return self._forward(ids, positions, attend)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor,
                 attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The layers; attend(layer, q, k, v) stores this step's k and v (rows, kv heads, hd) and returns the
        attention output (rows, kv heads, q heads per kv head, hd)."""
        rows = ids.shape[0]
        nq, nkv, hd = self.heads, self.kv_heads, self.head_dim
        cos, sin = self._rotation(positions)
        x = F.embedding(ids, self.embed)  # (rows, hidden)
        for i, layer in enumerate(self.layers):
            heads = layer["qkv"](self._norm(x, layer["norm1"])).view(rows, nq + 2 * nkv, hd)
            if layer["q_norm"] is None:
                qk = _rope(heads[:, :nq + nkv], cos, sin)  # q and k rotated together: (rows, nq + nkv, hd)
            else:  # qwen3: per-head rms norm of q and k before rope
                qk = torch.cat([self._norm(heads[:, :nq], layer["q_norm"]),
                                self._norm(heads[:, nq:nq + nkv], layer["k_norm"])], 1)
                qk = _rope(qk, cos, sin)
            # Grouped-query attention on the kv heads: each kv head's query heads act as its queries (HF's pack_gqa).
            q = qk[:, :nq].reshape(rows, nkv, nq // nkv, hd)
            out = attend(i, q, qk[:, nq:], heads[:, nq + nkv:])
            x = x + layer["o"](out.reshape(rows, nq * hd))
            gate, up = layer["gate_up"](self._norm(x, layer["norm2"])).split(layer["split"], -1)
            x = x + layer["down"](F.silu(gate) * up)
        return self.head(self._norm(x, self.final_norm))

    def _rotation(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotation(positions, self.inv_freq, self.dtype)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, self.eps)
        # HF's RMSNorm in half precision: normalised in float32, rounded, then scaled (F.rms_norm rounds once).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)


def rotation(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin (rows, 1, hd) at each row's position, in `dtype` as HF rounds them."""
    freqs = positions[:, None, None].float() * inv_freq  # (rows, 1, hd / 2): one head axis to broadcast
    angles = torch.cat((freqs, freqs), -1)
    sin = angles.sin().to(dtype)
    half = sin.shape[-1] // 2
    sin[..., :half].neg_()  # rotate_half(x) * sin == swap_halves(x) * (-sin_1, sin_2), exactly
    return angles.cos().to(dtype), sin


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (rows, heads, hd), HF's x * cos + rotate_half(x) * sin with the sign folded into sin."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x_2, x_1): one kernel instead of neg + cat
    return x * cos + swapped * signed_sin


def _tensors(linear: Callable) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a float linear made by _fuse or _single; None for an int8 module."""
    return (linear.keywords["weight"], linear.keywords["bias"]) if isinstance(linear, partial) else None


def _linears_of_one_kind(modules: list[nn.Module]) -> bool:
    """All plain nn.Linear (not a subclass such as bitsandbytes' Linear4bit) or all torch.ao int8 Linear."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    kinds = {type(m) for m in modules}
    return kinds in ({nn.Linear}, {QLinear})
