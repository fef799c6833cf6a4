"""Next-token cross-entropy straight from the last hidden states, so the (tokens, vocab) logits never exist whole."""
from __future__ import annotations

import torch

IGNORE = -100
# Architectures whose logits are exactly lm_head(base_model(...).last_hidden_state): no soft-capping, logit scale or
# bias. Any other model (or a PEFT wrapper) keeps the plain logits path.
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
# 8 MB of logits per chunk (256 rows of an 8,192 vocabulary): ~20% less time than 64 MB at once on a 2-core x86.
CHUNK_LOGITS_BYTES = 8 << 20


def plain_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder, lm_head) of a transformers causal LM whose logits are a bias-free projection of its last hidden
    state, else None."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or model.config.model_type not in PLAIN_HEAD_MODEL_TYPES:
        return None
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or model.base_model is model:
        return None
    return model.base_model, head


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden @ weight.T against labels (IGNORE skipped), `chunk` rows at a time.

    The gradients are computed in the forward pass, while each chunk's logits are still in cache, and only scaled in
    backward (Liger-Kernel's fused linear cross-entropy, in plain torch): the full logits and their gradient are never
    written to memory. Output layer + loss, forward and backward, 11M Llama, 1 CPU thread: 440 -> 336 ms.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        valid = labels != IGNORE                                                       # (N,)
        count = valid.sum()
        targets = labels.clamp(min=0)[:, None]                                         # (N, 1)
        grad_hidden = torch.empty_like(hidden)                                         # (N, H)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        direct = hidden.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(hidden.device.type)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, y, keep = hidden[s:s + chunk], targets[s:s + chunk], valid[s:s + chunk, None]
            logits = (h @ weight.t()).float()                                         # (C, V), like .float() logits
            # softmax in place, in the passes logsumexp alone would take (it allocates its own shifted copy)
            shifted = logits.sub_(logits.amax(-1, keepdim=True))                       # (C, V)
            picked = shifted.gather(1, y)                                              # (C, 1)
            grad = shifted.exp_()
            sumexp = grad.sum(-1, keepdim=True)                                        # (C, 1)
            total += ((sumexp.log() - picked) * keep).sum()
            grad.div_(sumexp)                                                          # softmax
            grad.scatter_add_(1, y, -torch.ones_like(y, dtype=grad.dtype)).mul_(keep)  # minus one-hot, masked
            grad = grad.to(weight.dtype)  # (under autocast the matmuls below cast as the plain path's backward does)
            if direct:  # fp32 outside autocast: the matmuls write and accumulate in place (no temporaries)
                torch.mm(grad, weight, out=grad_hidden[s:s + chunk])
                if grad_weight is not None:
                    grad_weight.addmm_(grad.t(), h)
            else:
                grad_hidden[s:s + chunk] = grad @ weight
                if grad_weight is not None:
                    grad_weight += grad.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss.float() / count
        if grad_weight is not None:
            grad_weight = (grad_weight * scale).to(ctx.weight_dtype)
        return (grad_hidden * scale).to(grad_hidden.dtype), grad_weight, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of hidden (B, T, H) projected by weight (V, H) against labels (B, T)."""
    chunk = max(64, CHUNK_LOGITS_BYTES // (4 * weight.shape[0]))  # rows whose fp32 logits stay in cache
    return LinearCrossEntropy.apply(hidden.flatten(0, 1), weight, labels.flatten(), chunk)
