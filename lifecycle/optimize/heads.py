"""Structured pruning of Llama-layout decoders: drop key/value head groups and MLP neurons by weight norm."""
from __future__ import annotations

import torch


def shrink(model, share: float) -> None:
    """Keep the (1 - share) strongest head groups and MLP neurons in every layer; update the config to match."""
    config = model.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    keep_kv = kept_groups(kv, heads // kv, config.hidden_size, share)
    keep_inner = config.intermediate_size - round(share * config.intermediate_size)
    for layer in model.model.layers:
        _shrink_attention(layer.self_attn, keep_kv, heads // kv, head_dim)
        _shrink_mlp(layer.mlp, keep_inner)
    config.num_attention_heads, config.num_key_value_heads = keep_kv * (heads // kv), keep_kv
    config.intermediate_size, config.head_dim = keep_inner, head_dim  # head_dim no longer follows hidden/heads


def kept_groups(kv: int, group: int, hidden_size: int, share: float) -> int | None:
    """Key/value groups to keep: nearest to (1 - share) of them whose head count divides hidden_size (transformers
    refuses to save a config where it does not), at least one and fewer than all; None if there is none."""
    fits = [k for k in range(1, kv) if hidden_size % (k * group) == 0]
    return min(fits, key=lambda k: (abs(k - (1 - share) * kv), k)) if fits else None


def _shrink_attention(attn, keep_kv: int, group: int, head_dim: int) -> None:
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    kv = k.out_features // head_dim
    # One score per key/value group: the norms of its query, key and value rows and of its output columns.
    score = (q.weight.view(kv, group * head_dim, -1).norm(dim=(1, 2))                  # (kv,)
             + k.weight.view(kv, head_dim, -1).norm(dim=(1, 2)) + v.weight.view(kv, head_dim, -1).norm(dim=(1, 2))
             + o.weight.view(o.out_features, kv, -1).norm(dim=(0, 2)))
    kept = score.topk(keep_kv).indices.sort().values                                   # (keep_kv,)
    kv_rows = (kept[:, None] * head_dim + torch.arange(head_dim)).flatten()            # (keep_kv * head_dim,)
    q_rows = (kept[:, None] * group * head_dim + torch.arange(group * head_dim)).flatten()
    attn.q_proj, attn.k_proj, attn.v_proj = _rows(q, q_rows), _rows(k, kv_rows), _rows(v, kv_rows)
    attn.o_proj = _columns(o, q_rows)


def _shrink_mlp(mlp, keep: int) -> None:
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    score = gate.weight.norm(dim=1) * up.weight.norm(dim=1) * down.weight.norm(dim=0)  # (intermediate,)
    kept = score.topk(keep).indices.sort().values
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = _rows(gate, kept), _rows(up, kept), _columns(down, kept)


def _rows(linear: torch.nn.Linear, index: torch.Tensor) -> torch.nn.Linear:
    """A Linear keeping only the output features in `index`."""
    out = torch.nn.Linear(linear.in_features, len(index), bias=linear.bias is not None)
    out.weight.data = linear.weight.data[index].clone()
    if linear.bias is not None:
        out.bias.data = linear.bias.data[index].clone()
    return out


def _columns(linear: torch.nn.Linear, index: torch.Tensor) -> torch.nn.Linear:
    """A Linear keeping only the input features in `index`."""
    out = torch.nn.Linear(len(index), linear.out_features, bias=linear.bias is not None)
    out.weight.data = linear.weight.data[:, index].clone()
    if linear.bias is not None:
        out.bias.data = linear.bias.data.clone()
    return out
