"""`lifecycle finetune`: every strategy on the one loop, on the data stage's instruction data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lifecycle.errors import ConfigError
from lifecycle.finetune.stage import run
from lifecycle.training import strategy as strategies

from conftest import TINY, cli, make_cfg

pytestmark = pytest.mark.integration
STRATEGIES = ["full", "lora", "ptuning", "adapter", "prompt_tuning", "prefix_tuning", "ia3", "llama_adapter"]
PROBE = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]])  # a fixed input whose logits are compared after reloading


@pytest.fixture(scope="session")
def base_dir(data_dir, tmp_path_factory) -> Path:
    """A tiny model pretrained on the shared data run: the fine-tuning base."""
    from lifecycle.pretrain.stage import run as pretrain

    run_dir = tmp_path_factory.mktemp("outputs") / "pretrain" / "base"
    pretrain(make_cfg("pretrain", run_dir, [*TINY, f"data.dir={data_dir}", "trainer.max_steps=60"]))
    return run_dir / "model"


def finetune_cfg(run_dir: Path, data_dir: Path, base_dir: Path, *overrides: str):
    return make_cfg("finetune", run_dir, [*TINY, f"data.dir={data_dir}", f"base.name_or_path={base_dir}",
                                          "epochs=null", "trainer.max_steps=24", "trainer.val_check_interval=8",
                                          "train.ckpt_every_n_steps=8", "data.seq_len=128", *overrides])


@pytest.fixture
def captured(monkeypatch):
    """Logits of the in-memory model on PROBE at the moment each strategy saves it."""
    seen = {}
    for cls in (strategies.Full, strategies.Peft, strategies.Bottleneck):
        def save(self, model, run_dir, _orig=cls.save):
            model.eval()
            with torch.no_grad():
                seen["logits"] = model(input_ids=PROBE).logits[:, -PROBE.shape[1]:].clone()
            return _orig(self, model, run_dir)
        monkeypatch.setattr(cls, "save", save)
    return seen


def reload_logits(run_dir: Path, base_dir: Path, kind: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from lifecycle.models.adapters import load_adapter

    if kind == "model":
        model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    else:
        model = load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), run_dir / "adapter")
    with torch.no_grad():
        return model.eval()(input_ids=PROBE).logits[:, -PROBE.shape[1]:]


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_learns_and_reloads_identically(name, data_dir, base_dir, tmp_path, captured):
    run_dir = tmp_path / "finetune" / name
    metrics = run(finetune_cfg(run_dir, data_dir, base_dir, f"strategy={name}"))
    assert metrics["finetune/val_loss_after"] < metrics["finetune/val_loss_before"]
    assert 0 < metrics["finetune/trainable_share"] <= 1
    assert (metrics["finetune/trainable_share"] == 1) == (name == "full")
    kind = "model" if name == "full" else "adapter"
    assert torch.allclose(reload_logits(run_dir, base_dir, kind), captured["logits"], atol=1e-5)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["metrics"]["finetune/trainable_params"] == metrics["finetune/trainable_params"]
    tok_dir = run_dir / kind
    assert "chat_template" in (tok_dir / "tokenizer_config.json").read_text() or (tok_dir / "chat_template.jinja").exists()


def test_lora_merge_matches_the_adapter(data_dir, base_dir, tmp_path, captured):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "finetune" / "lora"
    run(finetune_cfg(run_dir, data_dir, base_dir, "strategy=lora"))
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=PROBE).logits, captured["logits"], atol=1e-4)


def test_two_named_adapters_side_by_side(data_dir, base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from lifecycle.models.adapters import load_adapter

    for task, seed in (("task_a", 1), ("task_b", 2)):
        run(finetune_cfg(tmp_path / "finetune" / task, data_dir, base_dir, "strategy=adapter",
                         f"strategy.adapter_name={task}", f"seed={seed}"))
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model = load_adapter(model, tmp_path / "finetune" / "task_a" / "adapter", "task_a")
    model = load_adapter(model, tmp_path / "finetune" / "task_b" / "adapter", "task_b")
    outputs = {}
    for task in ("task_a", "task_b"):
        model.set_adapter(task)
        with torch.no_grad():
            outputs[task] = model.eval()(input_ids=PROBE).logits
    assert not torch.allclose(outputs["task_a"], outputs["task_b"])


def test_targets_that_do_not_exist_fail_before_training(data_dir, base_dir, tmp_path):
    cfg = finetune_cfg(tmp_path / "finetune" / "bad", data_dir, base_dir, "strategy=lora",
                       "strategy.target_modules=[q_proj,nope_proj]")
    with pytest.raises(ConfigError, match=r"\['nope_proj'\] do not exist.*valid: .*q_proj"):
        run(cfg)
    assert not (tmp_path / "finetune" / "bad" / "checkpoints").exists()


def test_sweep_over_strategies_from_the_cli(data_dir, base_dir, tmp_path):
    out = cli("lifecycle.finetune", "-m", f"paths.output_root={tmp_path}", *TINY, f"data.dir={data_dir}",
              f"base.name_or_path={base_dir}", "epochs=null", "trainer.max_steps=6", "data.seq_len=96",
              "strategy=full,lora,ptuning,adapter", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    manifests = sorted(tmp_path.glob("finetune/multirun/*/*/manifest.json"))
    assert [json.loads(m.read_text())["metrics"]["finetune/strategy"] for m in manifests] == \
        ["full", "lora", "ptuning", "adapter"]
