"""What the hardware can do: the precision it should train in and its measured peak FLOP/s."""
from __future__ import annotations

import time

import torch


def resolve_precision(value: str, accelerator: str) -> str:
    """`auto` -> bf16-mixed on a bf16-capable GPU, 16-mixed on another GPU, 32-true on CPU."""
    if value != "auto":
        return value
    on_gpu = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if not on_gpu:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                       seconds: float = 0.5) -> float:
    """Best FLOP/s of repeated n x n matmuls: the practical GEMM peak that MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def measure_read_bandwidth(device: torch.device, nbytes: int = 2**30, seconds: float = 1.0) -> float:
    """Best bytes/s of reading an `nbytes` buffer again and again, by a sum and by a matrix-vector product (each is
    the faster one on some machines): for nbytes = a model's weights (decode_bytes_per_token), the bandwidth a
    batch-1 decode step, which reads each weight once per token, can at best use, from whichever mix of cache and
    memory holds that much."""
    rows = max(1, nbytes // 4 // 1024)
    matrix = torch.ones(rows, 1024, device=device)
    vector = torch.ones(1024, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reads = (matrix.sum, lambda: torch.mv(matrix, vector))
    for read in reads:
        read()
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for read in reads:
            t0 = time.perf_counter()
            read()
            sync()
            best = max(best, matrix.numel() * 4 / (time.perf_counter() - t0))
    return best


def decode_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one batch-1 decode step reads: every parameter but the input embeddings (one row each),
    plus the output projection when it is tied to them; int8 packed weights count at their stored size."""
    from lifecycle.models.int8 import quantized_names

    embedding = model.get_input_embeddings().weight
    tensors = [p for p in model.parameters() if p is not embedding]
    modules = dict(model.named_modules())
    for name in quantized_names(model):  # torch.ao int8 Linear keeps its weight outside parameters()
        tensors += [t for t in (modules[name].weight(), modules[name].bias()) if t is not None]
    total = sum(t.numel() * t.element_size() for t in tensors)
    output = model.get_output_embeddings()
    if output is not None and getattr(output, "weight", None) is embedding:
        total += embedding.numel() * embedding.element_size()
    return total


def flops_per_token(n_params: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int) -> int:
    """Training FLOPs per token: 6N for the weights plus 12*L*H*Q*T for attention (PaLM, appendix B)."""
    return 6 * n_params + 12 * n_layers * n_heads * head_dim * seq_len


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> int:
    """flops_per_token for a transformers model; N counts every weight used in a matmul, i.e. all parameters
    but the input (and position) embeddings, plus the output projection when it is tied to the input."""
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    n_params -= sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    output = model.get_output_embeddings()
    if output is not None and output.weight is model.get_input_embeddings().weight:
        n_params += output.weight.numel()
    n_heads = c.num_attention_heads
    return flops_per_token(n_params, c.num_hidden_layers, n_heads, c.hidden_size // n_heads, seq_len)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls of a Lightning precision setting run in (for the matching GEMM peak)."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float64 if precision.startswith("64") else torch.float32
