"""Optimize passes and the model loader on tiny random Llamas: int8 round trip, structured pruning, the distillation
loss, refusals before any work (input untouched), and load_model's safety checks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lifecycle import artifacts
from lifecycle.errors import CheckpointError, ConfigError
from lifecycle.models import int8
from lifecycle.models.load import load_model

from conftest import make_cfg

PROBE = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]])


def tiny_llama(heads: int = 4, kv: int = 2):
    from lifecycle.models.build import llama

    torch.manual_seed(0)
    return llama(hidden_size=32, num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv,
                 intermediate_size=64, max_position_embeddings=128, rope_theta=10000.0, attention_dropout=0.0,
                 tie_word_embeddings=True, vocab_size=300, bos_token_id=0, eos_token_id=0, pad_token_id=1).eval()


def save_tiny(directory: Path, model=None) -> Path:
    """A model directory as save_pretrained writes it, with a word-level tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    (model or tiny_llama()).save_pretrained(directory, safe_serialization=True)
    vocab = {"<s>": 0, "<pad>": 1, **{f"w{i}": i for i in range(2, 300)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                            bos_token="<s>", eos_token="<s>", pad_token="<pad>").save_pretrained(directory)
    return directory


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def test_load_model_reads_a_plain_directory_in_eval_mode(tmp_path):
    model = tiny_llama()
    loaded, tokenizer = load_model(save_tiny(tmp_path / "m", model))
    assert not loaded.training and tokenizer.pad_token_id == 1
    torch.testing.assert_close(logits(loaded), logits(model))


def test_int8_round_trip_is_exact_and_smaller(tmp_path):
    from lifecycle.optimize.quantize import Int8
    from lifecycle.optimize.variant import save

    directory = save_tiny(tmp_path / "m")
    model, tokenizer = load_model(directory)
    quantized = Int8().apply(model, None)
    out = save(quantized, tokenizer, tmp_path / "v", "int8", [Int8()], {})
    loaded, _ = load_model(out)
    assert int8.quantized_names(loaded) == int8.quantized_names(quantized) != []
    torch.testing.assert_close(logits(loaded), logits(quantized), rtol=0, atol=0)
    # Honest size: decoder Linears shrink to a quarter; the tied head is now stored apart as int8; + fp32 scales.
    decoder = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n != "lm_head")
    scales = 4 * sum(m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    expected = (directory / "model.safetensors").stat().st_size - 3 * decoder + model.lm_head.weight.numel() + scales
    assert abs((out / int8.WEIGHTS).stat().st_size - expected) < 4096  # headers differ
    assert json.loads((out / "optimize.json").read_text())["passes"][0]["kind"] == "int8"


@pytest.mark.parametrize("heads,kv", [(4, 2), (4, 4)])
def test_structured_pruning_removes_the_share_and_still_generates(tmp_path, heads, kv):
    from transformers import AutoModelForCausalLM

    from lifecycle.optimize.prune import Structured

    model = tiny_llama(heads, kv)
    linear = lambda m: sum(p.numel() for n, p in m.named_parameters() if "layers" in n and p.ndim == 2)  # noqa: E731
    before = linear(model)
    Structured(share=0.5, recovery_steps=0).apply(model, None)
    assert linear(model) == before // 2
    model.save_pretrained(tmp_path / "p", safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert reloaded.config.num_attention_heads == heads // 2 and reloaded.config.intermediate_size == 32
    torch.testing.assert_close(logits(reloaded), logits(model))
    out = reloaded.generate(PROBE, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=1)
    assert out.shape == (1, PROBE.shape[1] + 4)


def test_magnitude_pruning_reaches_the_sparsity():
    from lifecycle.optimize.prune import Magnitude

    model = Magnitude(sparsity=0.5, recovery_steps=0).apply(tiny_llama(), None)
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    zeros = sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=0.01)


def test_distill_loss_is_the_mixed_ce_when_student_equals_teacher():
    from functools import partial

    from lifecycle.training.module import CausalLM

    student, teacher = tiny_llama(), tiny_llama()
    module = CausalLM(student, partial(torch.optim.AdamW), None, teacher=teacher, distill_alpha=0.25)
    batch = {"input_ids": PROBE, "labels": torch.roll(PROBE, -1)}
    ce, out = module.compute_loss(batch)
    torch.testing.assert_close(module.distill_loss(batch, out, ce), 0.75 * ce)  # KL of identical models is 0
    with torch.no_grad():
        student.lm_head.weight.add_(torch.randn_like(student.lm_head.weight))
    ce, out = module.compute_loss(batch)
    assert module.distill_loss(batch, out, ce) > 0.75 * ce + 1e-3
    module.train()
    assert student.training and not teacher.training


def lora_dir(tmp_path: Path, kind: str) -> Path:
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    base = save_tiny(tmp_path / "base")
    config = LoraConfig(r=2, target_modules=["q_proj"]) if kind == "lora" else \
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    peft = get_peft_model(load_model(base)[0], config)
    peft.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize("adapter,variant,overrides,words", [
    (None, "int4", [], "CUDA GPU"),
    (None, "prune50", ["passes.prune.sparsity=1.5"], "must be in (0, 1)"),
    (None, "heads50", ["passes.prune.share=0"], "must be in (0, 1)"),
    (None, "merge", [], "no adapter to merge"),
    ("lora", "int8", [], "put the merge pass first"),
    ("prompt", "merge_int8", [], "cannot merge into its base"),
    (None, "int8_compile", ["+passes.late=${passes.int8}"], "comes after"),
])
def test_a_pass_that_cannot_apply_is_refused_before_any_work(tmp_path, adapter, variant, overrides, words):
    from lifecycle.optimize.stage import run

    source = lora_dir(tmp_path, adapter) if adapter else save_tiny(tmp_path / "base")
    before = artifacts.dir_hash(tmp_path)
    run_dir = tmp_path / "out" / "optimize" / "r"
    cfg = make_cfg("optimize", run_dir, ["logger=none", f"optimize={variant}", f"source.model={source}",
                                         f"data.dir={tmp_path / 'no-data'}", *overrides])
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        run(cfg)
    assert not run_dir.exists() and artifacts.dir_hash(tmp_path) == before


def test_load_model_refuses_pickles_truncation_and_mismatch(tmp_path):
    directory = save_tiny(tmp_path / "m")
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        load_model(directory)
    weights.write_bytes(data)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(CheckpointError, match="config.json does not fit the weights.*mlp"):
        load_model(directory)
    weights.rename(directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickled weights \\(pytorch_model.bin\\)"):
        load_model(directory)


def test_a_sweep_report_gathers_the_base_and_every_job_row_in_order(tmp_path):
    from lifecycle.optimize import report

    base = {"variant": "base", "passes": "-", "params": 10, "size_mb": 4.0, "ppl_general": 100.0,
            "ppl_domain": 50.0, "tok_s_b1": 10.0, "tok_s_b8": 60.0, "ttft_ms": 5.0, "peak_mb": 1.0, "warmup_s": 0.1}
    artifacts.write_json(tmp_path / report.BASE, base)
    for job, name in ((10, "distill_half"), (0, "int8"), (1, "prune50")):
        row = report.with_changes({**base, "variant": name, "ppl_general": 102.0 + job}, base)
        artifacts.write_json(tmp_path / str(job) / report.ROW, row)
    rows = report.gather(tmp_path)
    assert [r["variant"] for r in rows] == ["base", "int8", "prune50", "distill_half"]
    assert rows[1]["ppl_general_change"] == pytest.approx(0.02)
    report.write(rows, tmp_path)
    table = (tmp_path / "report.md").read_text()
    assert "| int8 | 10 | 4.00 | 102.00 | +2.00% |" in table and "tok/s b8" in table
    assert (tmp_path / "quality_speed.png").read_bytes()[:4] == b"\x89PNG"
