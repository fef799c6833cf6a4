"""`lifecycle pretrain` end to end on a tiny model: learning, export, reload, resume, faults."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lifecycle.errors import CheckpointError, NonFiniteLossError
from lifecycle.pretrain.stage import run
from lifecycle.training.module import CausalLM

from conftest import ROOT, TINY, cli, make_cfg

pytestmark = pytest.mark.integration


def history(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def pretrain_cfg(run_dir: Path, data_dir: Path, *overrides: str):
    return make_cfg("pretrain", run_dir, [*TINY, f"data.dir={data_dir}", *overrides])


def test_loss_falls_and_model_reloads_untouched(data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "pretrain" / "r1"
    metrics = run(pretrain_cfg(run_dir, data_dir, "trainer.max_steps=60"))
    assert metrics["train/loss_last"] < metrics["train/loss_first"] - 0.5
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-3)
    assert metrics["train/tokens_per_s"] > 0 and 0 < metrics["train/mfu"] < 1

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    assert (run_dir / "model" / "model.safetensors").is_file()
    ids = tok("def ", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stage"] == "pretrain" and manifest["inputs"]["data"]["hash"].startswith("sha256:")
    assert manifest["metrics"]["val/loss"] == metrics["val/loss"]
    assert (run_dir.parent / "latest").resolve() == run_dir.resolve()
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == len(make_cfg(
        "pretrain", run_dir, TINY).samples.prompts)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_continued_pretraining_from_a_local_hf_model(data_dir, tmp_path):
    first = tmp_path / "pretrain" / "a"
    run(pretrain_cfg(first, data_dir, "trainer.max_steps=5"))
    second = tmp_path / "pretrain" / "b"
    # Not the smoke recipe: it sizes the default tiny_llama, and this model's size comes from its directory.
    cfg = make_cfg("pretrain", second, ["logger=none", f"data.dir={data_dir}", "data.seq_len=64", "model=hf_pretrained",
                                        f"model.name_or_path={first / 'model'}", "trainer.max_steps=5",
                                        "trainer.val_check_interval=5", "data.val_batches=2", "samples.max_new_tokens=4"])
    metrics = run(cfg)
    assert metrics["train/steps"] == 5 and (second / "model" / "config.json").is_file()


def _nan_at(step):
    original = CausalLM.train_loss

    def train_loss(self, batch):
        loss = original(self, batch)
        return loss * float("nan") if self.global_step == step else loss
    return train_loss


def test_nonfinite_halt_names_step_and_keeps_latest(data_dir, tmp_path, monkeypatch):
    good = tmp_path / "pretrain" / "good"
    run(pretrain_cfg(good, data_dir, "trainer.max_steps=4"))
    monkeypatch.setattr(CausalLM, "train_loss", _nan_at(7))
    bad = tmp_path / "pretrain" / "bad"
    with pytest.raises(NonFiniteLossError, match=r"step 7: loss is nan.*step000005\.ckpt|step 7: loss is nan.*last"):
        run(pretrain_cfg(bad, data_dir, "trainer.max_steps=20", "train.ckpt_every_n_steps=5"))
    assert (tmp_path / "pretrain" / "latest").resolve() == good.resolve()
    assert not (bad / "manifest.json").exists() and not (bad / "model").exists()
    saved = torch.load(bad / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 5  # nothing written after the bad step


def test_nonfinite_skip_leaves_parameters_unchanged(data_dir, tmp_path, monkeypatch):
    from lightning.pytorch import Callback

    seen = {}

    class Spy(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step in (3, 4):
                seen[trainer.global_step] = [p.detach().clone() for p in module.parameters()]

    monkeypatch.setattr(CausalLM, "train_loss", _nan_at(3))
    monkeypatch.setattr(CausalLM, "configure_callbacks", lambda self: [Spy()])
    metrics = run(pretrain_cfg(tmp_path / "pretrain" / "s", data_dir, "trainer.max_steps=6", "train.nonfinite=skip"))
    assert metrics["train/steps"] == 6
    assert all(torch.equal(a, b) for a, b in zip(seen[3], seen[4]))


def test_resume_refuses_other_model_dims(data_dir, tmp_path):
    first = tmp_path / "pretrain" / "a"
    run(pretrain_cfg(first, data_dir, "trainer.max_steps=2"))
    with pytest.raises(CheckpointError, match="shape"):
        run(pretrain_cfg(tmp_path / "pretrain" / "b", data_dir, f"ckpt_path={first}", "model.hidden_size=32"))


# Bit-exact resume after kill -9: dropout makes the RNG matter, so a resume that does not restore it drifts.
RESUME = [*TINY, "trainer.max_steps=80", "train.ckpt_every_n_steps=5", "model.attention_dropout=0.2",
          "trainer.val_check_interval=50"]


def _launch(run_dir: Path, data_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lifecycle.pretrain", f"hydra.run.dir={run_dir}",
                             f"paths.output_root={run_dir.parent.parent}", f"data.dir={data_dir}", *RESUME, *extra],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill9_and_resume_is_bit_exact(data_dir, tmp_path):
    root = tmp_path / "pretrain"
    full = _launch(root / "full", data_dir)
    assert full.wait(timeout=300) == 0, full.stderr.read()
    reference = history(root / "full")

    victim = _launch(root / "victim", data_dir)
    ckpt = root / "victim" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpt.is_file() and torch.load(ckpt, weights_only=True)["global_step"] >= 20):
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = torch.load(ckpt, weights_only=True)["global_step"]
    assert 20 <= killed_at < 80, "the kill should land mid-training"

    resumed = _launch(root / "resumed", data_dir, f"ckpt_path={root / 'victim'}")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    after = history(root / "resumed")
    assert min(after) == killed_at + 1 and max(after) == 80
    assert all(after[s] == reference[s] for s in after), "losses after resume differ from the uninterrupted run"

    # Negative control: the same resume without restoring RNG states must not match.
    control = _launch(root / "control", data_dir, f"ckpt_path={root / 'victim'}", "train.restore_rng=false")
    assert control.wait(timeout=300) == 0, control.stderr.read()
    drifted = history(root / "control")
    assert any(drifted[s] != reference[s] for s in drifted)


def test_ddp_two_processes(data_dir, tmp_path):
    run_dir = tmp_path / "pretrain" / "ddp"
    out = cli("lifecycle.pretrain", f"hydra.run.dir={run_dir}", f"paths.output_root={tmp_path}", f"data.dir={data_dir}",
              *TINY, "trainer=ddp", "trainer.max_steps=6", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["trainer"]["devices"] == 2 and manifest["metrics"]["train/steps"] == 6
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "train/loss" in r]) == 6  # rank 0 alone writes the history
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_unknown_hub_model_fails_fast_offline(data_dir, tmp_path):
    from lifecycle.errors import ConfigError

    cfg = make_cfg("pretrain", tmp_path / "pretrain" / "x", ["logger=none", f"data.dir={data_dir}",
                                                              "model=hf_pretrained", "model.name_or_path=no-org/no-model"])
    with pytest.raises(ConfigError, match="no-org/no-model.*cannot load it"):
        run(cfg)
