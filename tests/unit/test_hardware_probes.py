"""What a decode step must read, and the bandwidth probe it is compared with (benchmarks/decode_peers.py)."""
from __future__ import annotations

import math

import torch

from lifecycle.hardware import decode_bytes_per_token, measure_read_bandwidth
from lifecycle.models.build import llama


def small(tied: bool):
    torch.manual_seed(0)
    return llama(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=64, rope_theta=10000.0, attention_dropout=0.0,
                 tie_word_embeddings=tied, vocab_size=100, bos_token_id=0, eos_token_id=0).eval()


def test_decode_bytes_count_every_weight_once_and_the_tied_head():
    per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32  # q, k+v (2 kv heads x 8), o, mlp, 2 norms
    body = 2 * per_layer + 32  # + final norm; the input embedding is one row per token, not counted
    assert decode_bytes_per_token(small(tied=True)) == 4 * (body + 100 * 32)  # tied head read as the output matmul
    assert decode_bytes_per_token(small(tied=False)) == 4 * (body + 100 * 32)  # its own head


def test_int8_weights_count_at_their_stored_size():
    from lifecycle.models import int8

    fp32 = decode_bytes_per_token(small(tied=False))
    quantized = decode_bytes_per_token(int8.quantize(small(tied=False)))
    assert quantized < 0.5 * fp32  # int8 linears: a quarter of their fp32 bytes; norms and biases stay


def test_read_bandwidth_is_a_finite_positive_rate():
    rate = measure_read_bandwidth(torch.device("cpu"), 8 * 2**20, seconds=0.05)
    assert math.isfinite(rate) and rate > 1e8  # any machine reads 8 MB faster than 100 MB/s
