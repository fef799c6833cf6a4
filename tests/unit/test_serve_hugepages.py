"""lifecycle.serve.hugepages: the arena the fast path's transposed weights live in, huge pages where the system has
them, and the decoder filling it exactly."""
from __future__ import annotations

import pytest
import torch
from serve_models import tokenizer  # noqa: F401
from test_serve_fastpath import random_model

from lifecycle.serve import hugepages
from lifecycle.serve.served import ServedModel

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages here")


def _huge_kb(address: int) -> int:
    """AnonHugePages of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            inside = start <= address < end
        elif inside and fields[0] == "AnonHugePages:":
            return int(fields[1])
    return 0


@needs_thp
def test_arena_tensors_are_aligned_disjoint_and_in_huge_pages():
    arena = hugepages.Arena(3 * hugepages.HUGE_PAGE)
    a = arena.take((1000, 300), torch.float32)
    b = arena.take((7,), torch.float32)
    c = arena.take((500, 1024), torch.float32)
    assert a.data_ptr() % hugepages.HUGE_PAGE == 0
    assert b.data_ptr() % hugepages.ALIGN == 0 and c.data_ptr() % hugepages.ALIGN == 0
    assert a.data_ptr() + a.numel() * 4 <= b.data_ptr() and b.data_ptr() + 28 <= c.data_ptr()
    a.fill_(1.0), b.fill_(2.0), c.fill_(3.0)
    assert a.sum() == 300_000 and b.sum() == 14 and c.sum() == 1_536_000
    assert _huge_kb(a.data_ptr()) >= 2048


@needs_thp
def test_the_mapping_lives_as_long_as_any_tensor_taken_from_it():
    import gc

    size = 64 << 20

    def mappings() -> int:  # mappings of exactly the arena's length (its size plus one huge page)
        spans = (line.split()[0].split("-") for line in open("/proc/self/maps"))
        return sum(int(b, 16) - int(a, 16) == size + hugepages.HUGE_PAGE for a, b in spans)

    before = mappings()
    arena = hugepages.Arena(size)
    weight = arena.take((1000, 1000), torch.float32).fill_(3.0)
    del arena
    gc.collect()
    assert mappings() == before + 1 and weight.sum() == 3_000_000  # the tensor keeps it
    del weight
    gc.collect()
    assert mappings() == before  # unmapped with the last tensor


def test_past_its_size_or_without_huge_pages_it_hands_out_ordinary_tensors(monkeypatch):
    arena = hugepages.Arena(4096)
    assert arena.take((2048,), torch.float32).shape == (2048,)  # 8 KB: more than the arena holds
    monkeypatch.setattr(hugepages, "available", lambda: False)
    plain = hugepages.Arena(1 << 20)
    assert plain.bytes is None and plain.take((3, 5), torch.float32).shape == (3, 5)


@needs_thp
@pytest.mark.parametrize("family", ["llama_gqa", "llama_tied", "llama_biases"])
def test_the_fast_path_fills_its_arena_exactly_with_every_transposed_matrix(family, tokenizer):
    model = random_model(family)
    fast = ServedModel(model, tokenizer, "base").fast
    arena = fast.arena
    assert arena.huge and arena.used == arena.size > 0
    low = arena.bytes.data_ptr()
    for param, _ in fast.fused:
        if param.dim() == 2:
            assert low <= param.data_ptr() < low + arena.size, "a fused weight outside the arena"


def test_int8_modules_take_nothing_from_the_fast_paths_arena(tokenizer):
    fast = ServedModel(random_model("llama_int8"), tokenizer, "base").fast
    assert fast.arena.size == 0 and fast.arena.used == 0


@needs_thp
@pytest.mark.parametrize("family", ["llama_int8", "llama_tied", "llama_biases"])
def test_the_c_steps_packed_matrices_fill_their_arena_exactly(family, tokenizer):
    step = ServedModel(random_model(family), tokenizer, "base", native=True).fast.native
    assert step.int8 == (family == "llama_int8") and step.arena.huge and step.arena.used == step.arena.size > 0
