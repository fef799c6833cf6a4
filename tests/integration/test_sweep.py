"""`lifecycle sweep` offline: Optuna trials as real tiny pretrain runs, resumed by running it again; DDP ranks agree."""
from __future__ import annotations

import json

import pytest
import yaml

from lifecycle.sweep.stage import run

from conftest import ROOT, TINY

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~2 min on 2 shared cores
TRIAL = [*TINY, "trainer.max_steps=4", "trainer.val_check_interval=2", "data.val_batches=1",
         "samples.max_new_tokens=2", "samples.prompts=[x]"]


def sweep_file(tmp_path, n_trials: int, *extra: str):
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump({
        "stage": "pretrain", "objective": {"metric": "val/loss", "direction": "minimize"}, "n_trials": n_trials,
        "sampler": {"_target_": "optuna.samplers.RandomSampler", "seed": 0},
        "params": {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                   "scheduler.warmup_steps": {"type": "categorical", "choices": [1, 2]}},
        "fixed": [*TRIAL, *extra]}))
    return str(path)


def test_sweep_runs_trials_summarises_and_resumes(data_dir, tmp_path):
    overrides = [f"data.dir={data_dir}", f"paths.output_root={tmp_path}"]
    best = run(sweep_file(tmp_path, 2), overrides)
    summary = json.loads((tmp_path / "sweep" / "lr" / "summary.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["COMPLETE", "COMPLETE"] and best["sweep/trials"] == 2
    assert best["val/loss"] == min(t["value"] for t in summary["trials"]) == summary["best"]["value"]
    for t in summary["trials"]:  # each trial is a normal run whose config holds the sampled values
        manifest = json.loads((tmp_path / "sweep" / "lr" / f"trial-{t['number']:03d}" / "manifest.json").read_text())
        assert manifest["config"]["optimizer"]["lr"] == pytest.approx(t["params"]["optimizer.lr"])
        assert manifest["metrics"]["val/loss"] == t["value"]
    assert "| trial | state |" in (tmp_path / "sweep" / "lr" / "summary.md").read_text()

    again = run(sweep_file(tmp_path, 3), overrides)  # the same command with a larger total continues the study
    resumed = json.loads((tmp_path / "sweep" / "lr" / "summary.json").read_text())["trials"]
    assert again["sweep/trials"] == 3 and resumed[:2] == summary["trials"]
    assert resumed[2]["params"] not in [t["params"] for t in summary["trials"]]


def test_ddp_trial_gives_every_rank_the_same_hyperparameters(data_dir, tmp_path, monkeypatch):
    echo = tmp_path / "echo"
    monkeypatch.setenv("RANK_ECHO_DIR", str(echo))
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    hook = "+hydra.callbacks.echo._target_=rank_echo.RankEcho"
    best = run(sweep_file(tmp_path, 1, "trainer=ddp", "trainer.devices=2"),
               [f"data.dir={data_dir}", f"paths.output_root={tmp_path}", hook])
    seen = [json.loads(p.read_text()) for p in sorted(echo.glob("rank*.json"))]
    assert sorted(p.name[:5] for p in echo.glob("rank*.json")) == ["rank0", "rank1"]
    trial = json.loads((tmp_path / "sweep" / "lr" / "summary.json").read_text())["trials"][0]
    assert seen[0] == seen[1] and seen[0]["optimizer.lr"] == pytest.approx(trial["params"]["optimizer.lr"])
    assert best["train/steps"] == 4
