"""`lifecycle optimize` end to end on a tiny model pretrained on the shared data run: int8 keeps perplexity,
distillation moves the student toward the teacher, structured pruning shrinks, compile matches eager."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lifecycle import artifacts
from lifecycle.models.load import load_model
from lifecycle.optimize.stage import run

from conftest import TINY, make_cfg

pytestmark = pytest.mark.integration
FAST_BENCH = ["bench.new_tokens=4", "bench.repeats=1", "bench.prompt_tokens=8", "bench.threads=1", "data.val_batches=2"]


@pytest.fixture(scope="module")
def model_dir(data_dir, tmp_path_factory) -> Path:
    """A tiny Llama trained a little, so perplexity is far from the vocabulary size and comparisons mean something."""
    from lifecycle.pretrain.stage import run as pretrain

    run_dir = tmp_path_factory.mktemp("outputs") / "pretrain" / "base"
    pretrain(make_cfg("pretrain", run_dir, [*TINY, f"data.dir={data_dir}", "trainer.max_steps=60",
                                            "samples.max_new_tokens=4"]))
    return run_dir / "model"


def optimize(tmp_path: Path, data_dir: Path, model_dir: Path, variant: str, *overrides: str) -> tuple[dict, Path]:
    run_dir = tmp_path / "outputs" / "optimize" / variant
    cfg = make_cfg("optimize", run_dir, [*TINY, f"optimize={variant}", f"source.model={model_dir}",
                                         f"data.dir={data_dir}", *FAST_BENCH, *overrides])
    return run(cfg), run_dir


def test_int8_keeps_perplexity_and_leaves_the_input_untouched(data_dir, model_dir, tmp_path):
    before = artifacts.dir_hash(model_dir)
    metrics, run_dir = optimize(tmp_path, data_dir, model_dir, "int8")
    assert metrics["optimize/base/ppl_general"] < 700  # trained: well below the 1,024-token vocabulary
    assert abs(metrics["optimize/ppl_general_change"]) < 0.02 and abs(metrics["optimize/ppl_domain_change"]) < 0.02
    assert metrics["optimize/size_mb"] < metrics["optimize/base/size_mb"]
    assert artifacts.dir_hash(model_dir) == before
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["metrics"]["passes"][0]["kind"] == "int8"
    assert (tmp_path / "outputs" / "optimize" / "latest").resolve() == run_dir.resolve()
    rows = json.loads((run_dir / "report.json").read_text())
    assert [r["variant"] for r in rows] == ["base", "int8"] and (run_dir / "quality_speed.png").stat().st_size > 0
    model, _ = load_model(run_dir / "model")
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_distillation_moves_the_student_toward_the_teacher(data_dir, model_dir, tmp_path):
    metrics, run_dir = optimize(tmp_path, data_dir, model_dir, "distill_half", "passes.distill.steps=30")
    fit = json.loads((run_dir / "manifest.json").read_text())["metrics"]["passes"][0]["training"]
    assert fit["val_loss_after"] < fit["val_loss_before"]
    assert abs(fit["val_loss_after"] - fit["teacher_val_loss"]) < abs(fit["val_loss_before"] - fit["teacher_val_loss"])
    assert metrics["optimize/params"] < metrics["optimize/base/params"]


def test_structured_pruning_shrinks_the_saved_model(data_dir, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    metrics, run_dir = optimize(tmp_path, data_dir, model_dir, "heads50", "passes.prune.recovery_steps=10")
    pruned = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert pruned.config.num_attention_heads == 1 and pruned.config.intermediate_size == 64
    assert metrics["optimize/params"] < metrics["optimize/base/params"]
    fit = json.loads((run_dir / "manifest.json").read_text())["metrics"]["passes"][0]["recovery"]
    assert fit["val_loss_after"] < fit["val_loss_before"]


@pytest.mark.slow
def test_compiled_variant_matches_eager(data_dir, model_dir, tmp_path):
    metrics, run_dir = optimize(tmp_path, data_dir, model_dir, "compile")
    compiled, _ = load_model(run_dir / "model")
    eager, _ = load_model(model_dir)
    probe = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]])
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=probe).logits, eager(input_ids=probe).logits,
                                   rtol=1e-4, atol=1e-4)
    assert metrics["optimize/warmup_s"] > metrics["optimize/base/warmup_s"]
