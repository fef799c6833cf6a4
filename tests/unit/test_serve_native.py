"""The C decode step (lifecycle.serve.native) against the HF forward: logits step by step per family, with 1 and 2
threads, more rows than one kernel call takes, int8 weights, rope tables outgrown; its build cache and what happens
without a compiler."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from serve_models import tokenizer  # noqa: F401
from test_serve_fastpath import DIMS, FAMILIES, lockstep, nan_empty, random_model
from transformers import LlamaConfig, LlamaForCausalLM

from lifecycle.errors import ConfigError
from lifecycle.serve import batch as batch_module
from lifecycle.serve import native
from lifecycle.serve.batch import Batch, merge
from lifecycle.serve.engine import LocalEngine
from lifecycle.serve.served import ServedModel

FLOAT_FAMILIES = [f for f in FAMILIES if f != "llama_int8"]


@pytest.fixture
def small_grow(monkeypatch):
    monkeypatch.setattr(batch_module, "GROW", 4)  # a capacity growth every 4 steps: the cache pointers change
    # and uninitialised storage NaN: a step that read a column nobody wrote would show
    monkeypatch.setattr(batch_module, "_empty", nan_empty)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("family", FLOAT_FAMILIES)
def test_native_steps_equal_the_hf_forward_through_joins_leaves_and_growth(family, tokenizer, small_grow, threads):
    model = random_model(family)
    fast = ServedModel(model, tokenizer, "base", native=True)
    slow = ServedModel(copy.deepcopy(random_model(family)), tokenizer, "base", fast_decode=False)
    assert fast.fast.native is not None
    worst, grows = lockstep(fast, slow, 24)
    assert worst < 1e-5 and grows >= 4


@pytest.mark.parametrize("head_dim", [64, 128])
def test_head_sizes_with_their_own_attention_kernels(head_dim, tokenizer, small_grow, threads):
    def model():
        torch.manual_seed(0)
        config = LlamaConfig(**{**DIMS, "hidden_size": 2 * head_dim, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "head_dim": head_dim})
        return LlamaForCausalLM(config).eval()
    fast = ServedModel(model(), tokenizer, "base", native=True)
    slow = ServedModel(model(), tokenizer, "base", fast_decode=False)
    assert fast.fast.head_dim == head_dim
    worst, grows = lockstep(fast, slow, 24)
    assert worst < 1e-5 and grows >= 4


def test_sizes_off_every_vector_width_equal_the_hf_forward(tokenizer, small_grow, threads):
    # hidden 40 (head_dim 10: the generic attention kernel), MLP 70, vocabulary 321: every product ends in a
    # part-filled panel and a scalar tail of its epilogue
    def model():
        torch.manual_seed(0)
        config = LlamaConfig(**{**DIMS, "hidden_size": 40, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "intermediate_size": 70, "vocab_size": 321})
        return random_model_from(LlamaForCausalLM(config).eval())
    fast = ServedModel(model(), tokenizer, "base", native=True)
    slow = ServedModel(model(), tokenizer, "base", fast_decode=False)
    assert fast.fast.native is not None and fast.fast.head_dim == 10
    worst, grows = lockstep(fast, slow, 24)
    assert worst < 1e-5 and grows >= 4


def test_a_wrong_rope_table_fails_the_comparison(tokenizer, small_grow):
    """Negative control: the comparison catches a C step that is subtly wrong."""
    fast = ServedModel(random_model("llama_gqa"), tokenizer, "base", native=True)
    slow = ServedModel(random_model("llama_gqa"), tokenizer, "base", fast_decode=False)
    fast.fast.native.sin.mul_(-1)
    assert lockstep(fast, slow, 8)[0] > 1e-3


def _prefilled(model, rows: int, length: int) -> Batch:
    torch.manual_seed(1)
    prompts = torch.randint(1, model.config.vocab_size, (rows, length))
    with torch.no_grad():
        cache = model(prompts, use_cache=True).past_key_values
    return Batch.from_prefill(cache, torch.ones(rows, length, dtype=torch.bool))


def _steps(step, batch: Batch, ids: torch.Tensor, n: int) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for _ in range(n):
            positions, mask = batch.step_inputs(torch.float32)
            logits = step(ids, positions[:, 0], mask, batch)
            out.append(logits)
            ids = logits.argmax(-1)
            batch.advance()
    return out


def _hf_step(model):
    def step(ids, positions, mask, batch):
        return model(input_ids=ids[:, None], position_ids=positions[:, None], attention_mask=mask, cache=batch,
                     use_cache=True).logits[:, -1]
    return step


def test_int8_weights_equal_their_dequantized_float32_model_on_more_rows_than_one_kernel_call(tokenizer, threads):
    # The C step is weight-only int8: x @ (q * scale). A float32 model holding exactly q * scale is its reference,
    # both decoding the same prefilled batch of 6 rows (kernel calls take 4).
    from lifecycle.models import int8

    quantized = random_model("llama_int8")
    dequantized = random_model("llama_gqa")
    with torch.no_grad():
        for name, param in quantized.named_parameters():  # norms and embedding: float in both
            dequantized.get_parameter(name).copy_(param)
        for name, module in quantized.named_modules():
            if hasattr(module, "weight") and callable(module.weight):
                dequantized.get_submodule(name).weight.copy_(module.weight().dequantize())
    assert int8.quantized_names(quantized)
    step = ServedModel(quantized, tokenizer, "base", native=True).fast
    assert step.native is not None and step.native.int8
    batch = _prefilled(dequantized, 6, 9)
    reference = copy.deepcopy(batch)
    ids = torch.arange(2, 8)
    got, want = _steps(step, batch, ids, 10), _steps(_hf_step(dequantized), reference, ids, 10)
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) < 1e-4


@pytest.mark.parametrize("rows", [2, 5, 9, 10, 17])
def test_batches_of_any_size_equal_the_hf_forward(rows, tokenizer, threads):
    # Rows go through the kernels in groups of up to 8; up to 4 rows take several panels at once.
    model = random_model("llama_biases")
    step = ServedModel(model, tokenizer, "base", native=True).fast
    reference_model = random_model("llama_biases")
    batch = _prefilled(reference_model, rows, 5)
    reference = copy.deepcopy(batch)
    ids = torch.arange(rows) + 2
    got, want = _steps(step, batch, ids, 4), _steps(_hf_step(reference_model), reference, ids, 4)
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) < 1e-5


def _ragged_model():
    # no dimension a multiple of the 32-column panel: every matrix ends in a part-filled one
    torch.manual_seed(0)
    config = LlamaConfig(**{**DIMS, "vocab_size": 333, "intermediate_size": 100, "num_key_value_heads": 2})
    return random_model_from(LlamaForCausalLM(config).eval())


def random_model_from(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model


@pytest.mark.parametrize("kind", ["ragged", "int8"])
def test_a_rows_logits_are_the_same_bits_whatever_shares_its_batch_and_however_many_threads(kind, tokenizer):
    # Each output is one chain of multiply-adds over the inputs in order, whichever tile (1, 3 or 8 + 2 rows) and
    # thread computes it. Before panels, a row alone and a row among others were summed in other orders.
    model = _ragged_model() if kind == "ragged" else random_model("llama_int8")
    step = ServedModel(model, tokenizer, "base", native=True).fast
    assert step.native is not None and step.native.int8 == (kind == "int8")
    reference = _ragged_model() if kind == "ragged" else random_model("llama_gqa")
    batch = _prefilled(reference, 10, 5)
    ids = torch.arange(10) + 2
    before = torch.get_num_threads()
    try:
        runs = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs[threads] = _steps(step, copy.deepcopy(batch), ids, 4)
            for rows in ([0], [3, 5, 9]):
                alone = _steps(step, merge([(copy.deepcopy(batch), rows)]), ids[rows], 4)
                for together, apart in zip(runs[threads], alone):
                    assert torch.equal(together[rows], apart)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(runs[1], runs[2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_pack_lays_each_panel_of_columns_out_contiguously_and_zeroes_the_last_ones_spare_columns(dtype):
    weight = torch.randint(-100, 100, (7, 70)).to(dtype)
    for source in (weight, weight.t().contiguous().t()):  # row-major, and a transposed view (the fast path's)
        packed = native.pack(source, torch.full(native.packed_shape(7, 70), 99, dtype=dtype))
        assert packed.shape == (3, 7, 32) and packed.is_contiguous()
        for column in range(70):
            assert torch.equal(packed[column // 32, :, column % 32], weight[:, column])
        assert (packed[2, :, 70 - 64:] == 0).all()


@pytest.mark.parametrize("rows", [3, 9])
def test_a_wide_head_ending_in_a_part_filled_panel_equals_the_hf_forward(rows, tokenizer, threads):
    # 514 panels of 32 columns, split between the threads; the last holds 5 columns, so the epilogue's vector and
    # scalar tails both run.
    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**{**DIMS, "vocab_size": 2 * 8192 + 37, "num_key_value_heads": 2})).eval()
    step = ServedModel(model(), tokenizer, "base", native=True).fast
    reference_model = model()
    batch = _prefilled(reference_model, rows, 5)
    reference = copy.deepcopy(batch)
    ids = torch.arange(rows) + 8190
    got, want = _steps(step, batch, ids, 3), _steps(_hf_step(reference_model), reference, ids, 3)
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) < 1e-5


def test_positions_past_the_rope_table_grow_it(tokenizer):
    model = random_model("llama")
    step = ServedModel(model, tokenizer, "base", native=True).fast
    step.native._tables(3)  # the prompt below already reaches position 8
    batch = _prefilled(model, 2, 8)
    reference = copy.deepcopy(batch)
    ids = torch.tensor([3, 4])
    got, want = _steps(step, batch, ids, 6), _steps(_hf_step(random_model("llama")), reference, ids, 6)
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) < 1e-5
    assert step.native.model.max_pos >= 14


def test_a_token_id_outside_the_embedding_is_refused_not_read(tokenizer):
    model = random_model("llama")
    step = ServedModel(model, tokenizer, "base", native=True).fast
    batch = _prefilled(model, 2, 4)
    before = [layer.keys.clone() for layer in batch.layers]
    positions, mask = batch.step_inputs(torch.float32)
    with pytest.raises(ValueError, match="outside the embedding's 320 rows"):
        step(torch.tensor([3, 320]), positions[:, 0], mask, batch)
    assert all(torch.equal(a, layer.keys) for a, layer in zip(before, batch.layers))  # nothing written


def test_the_build_is_cached_per_source(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFECYCLE_NATIVE_CACHE", str(tmp_path / "cache"))
    first = native.build()
    assert first.parent == tmp_path / "cache" and first.is_file()
    assert native.build() == first  # no second compile
    edited = tmp_path / "native_step.c"
    edited.write_text(native.SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(native, "SOURCE", edited)
    second = native.build()
    assert second != first
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".so", ".so"]  # no partial file left
    header = tmp_path / "include" / "vectors.h"  # the shared header is part of the digest and on the include path
    header.parent.mkdir()
    header.write_text(native.HEADER.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(native, "HEADER", header)
    assert native.build() not in (first, second)


def test_the_build_is_named_by_the_cpus_instructions_not_only_its_model_name(tmp_path, monkeypatch):
    """Two virtual machines both called "AMD EPYC" (one with AVX-512, one without) must not share a library built
    with -march=native: the other would die of SIGILL."""
    names = []
    for flags in ("fpu sse2 avx2 avx512f avx512_vnni", "fpu sse2 avx2"):
        info = tmp_path / f"cpuinfo-{len(names)}"
        info.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
                        f"model name\t: AMD EPYC\nflags\t\t: {flags}\n")
        monkeypatch.setattr(native, "CPUINFO", info)
        names.append(native._cpu())
    assert names[0] != names[1]
    assert "AMD EPYC" in names[0] and "avx512f" in names[0]
    monkeypatch.setattr(native, "CPUINFO", tmp_path / "missing")
    assert native._cpu()  # no /proc/cpuinfo: the platform's name


def test_without_a_compiler_auto_keeps_the_torch_step_and_true_says_why(tokenizer, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("LIFECYCLE_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_library", None)
    with caplog.at_level(logging.WARNING, logger="lifecycle.serve.fastpath"):
        served = ServedModel(random_model("llama"), tokenizer, "base", native="auto")
    assert served.fast is not None and served.fast.native is None
    assert "no-such-compiler" in caplog.text and "torch fast path serves" in caplog.text
    with pytest.raises(native.NativeUnavailable, match="no-such-compiler.*native=auto"):
        ServedModel(random_model("llama"), tokenizer, "base", native=True)


def test_a_model_with_int8_layers_and_a_float_head_keeps_the_torch_step(tokenizer):
    from lifecycle.models import int8

    model = random_model("llama")
    head = model.lm_head
    model = int8.quantize(model)
    model.lm_head = head  # only the layers quantized
    served = ServedModel(model, tokenizer, "base", native="auto")
    assert served.fast is not None and served.fast.native is None


def test_half_precision_models_keep_the_torch_step(tokenizer):
    served = ServedModel(random_model("llama").to(torch.bfloat16), tokenizer, "base", native="auto")
    assert served.fast is not None and served.fast.native is None


def test_the_engine_rejects_a_bad_native_setting(tmp_path):
    with pytest.raises(ConfigError, match="deploy.engine.native must be true, false or auto, got 'yes'"):
        LocalEngine(str(tmp_path), native="yes")
