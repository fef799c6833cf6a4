"""Bad overrides fail before any model loads, naming the key and the reason."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle.config import validate
from lifecycle.errors import ConfigError

from conftest import cli, make_cfg


@pytest.mark.parametrize("override, words", [
    ("trainer.max_steps=abc", ["trainer.max_steps", "abc"]),
    ("optimizer.lr=-1", ["optimizer.lr", "> 0"]),
    ("+trainer.max_stepz=5", ["trainer.max_stepz", "TrainerSchema"]),
    ("+model.hiden_size=5", ["model.hiden_size", "unknown key", "hidden_size"]),
    ("model=hf_pretrained", ["model.name_or_path", "required"]),
    ("data.batch_size=0", ["data.batch_size", ">= 1"]),
    ("scheduler.min_lr_ratio=2", ["scheduler.min_lr_ratio", "[0, 1]"]),
    ("precision.value=fp8", ["precision", "32-true"]),
    ("train.nonfinite=ignore", ["train.nonfinite", "ignore"]),
    ("+logger.api_key=not-a-real-key-0000", ["logger.api_key", "environment"]),
])
def test_bad_pretrain_override_names_key(override, words, tmp_path):
    cfg = make_cfg("pretrain", tmp_path / "pretrain" / "run", [override])
    with pytest.raises(ConfigError) as err:
        validate(cfg, "pretrain")
    for w in words:
        assert w in str(err.value), str(err.value)


def test_files_source_without_path(tmp_path):
    with pytest.raises(ConfigError, match=r"sources.files.path is required"):
        validate(make_cfg("data", tmp_path / "data" / "run", ["source=[files]"]), "data")


@pytest.mark.parametrize("override, words", [
    ("workers=0", ["workers", ">= 1"]),
    ("val_fraction=0.9", ["val_fraction", "(0, 0.5]"]),
    ("+sources.stdlib.includ_docstrings=true", ["sources.stdlib.includ_docstrings", "unknown key"]),
    ("source=[]", ["sources", "none selected"]),
    ("decontam.ngram=2", ["decontam.ngram", ">= 5"]),
])
def test_bad_data_override_names_key(override, words, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg("data", tmp_path / "data" / "run", [override]), "data")
    for w in words:
        assert w in str(err.value), str(err.value)


@pytest.mark.parametrize("args, words", [
    (["trainer.max_steps=abc"], ["error: trainer.max_steps", "abc"]),
    (["optimizer.lr=-1"], ["error: optimizer.lr"]),
    (["trainer.max_step=5"], ["max_step"]),  # Hydra itself refuses keys that are not in the config
])
def test_cli_exits_nonzero_before_loading(args, words, tmp_path):
    out = cli("lifecycle.pretrain", f"paths.output_root={tmp_path}", *args, timeout=60)
    assert out.returncode != 0
    for w in words:
        assert w in out.stderr, out.stderr
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("model"))


def test_cli_help_and_cfg_are_fast_and_work(tmp_path):
    out = cli("lifecycle.pretrain", "--cfg", "job", timeout=60)
    assert out.returncode == 0 and "_target_: lightning.pytorch.Trainer" in out.stdout
    out = cli("lifecycle.pretrain", "--info", "defaults-tree", timeout=60)
    assert out.returncode == 0 and "model: tiny_llama" in out.stdout
    out = cli("lifecycle.cli", "--help", timeout=60)
    assert out.returncode == 0 and "pretrain" in out.stdout
    script = Path(sys.executable).parent / "lifecycle"  # the installed console script
    out = subprocess.run([script, "pretrain", "--cfg", "job", "--resolve"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "tiny_llama" not in out.stdout and "hidden_size: 320" in out.stdout
    out = subprocess.run([script, "nosuchstage"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "unknown stage" in out.stderr


@pytest.mark.parametrize("model, keys", [
    ("tiny_llama", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}),
    ("tiny_gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 2}),
])
def test_smoke_shrinks_either_model(model, keys, tmp_path):
    """experiment=smoke sets the size once (model_size) and each model config reads it under its own names: it used
    to set Llama's keys on the model node, which a GPT-2 model config then failed on."""
    cfg = make_cfg("pretrain", tmp_path / "pretrain" / "run", ["experiment=smoke", f"model={model}"])
    validate(cfg, "pretrain")
    assert {k: cfg.model[k] for k in keys} == keys
    default = make_cfg("pretrain", tmp_path / "pretrain" / "full", [f"model={model}"])
    assert all(default.model[k] > v for k, v in keys.items())


def test_smoke_keeps_an_explicit_model_override(tmp_path):
    cfg = make_cfg("pretrain", tmp_path / "pretrain" / "run", ["experiment=smoke", "model.hidden_size=32"])
    assert (cfg.model.hidden_size, cfg.model.num_hidden_layers) == (32, 2)
