"""`lifecycle compare` on a fabricated outputs tree: the lineage join, the filters, the no-match error, the files."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from lifecycle.compare.stage import run
from lifecycle.errors import LifecycleError

from conftest import make_cfg


def manifest(run_dir: Path, stage: str, metrics: dict, inputs: dict, created: str = "2026-11-29T10:00:00+0000",
             name: str = "default", config: dict | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "manifest.json").write_text(json.dumps({"stage": stage, "created": created, "duration_s": 1,
                                                       "inputs": inputs, "metrics": metrics,
                                                       "config": {"name": name, **(config or {})}}))
    return run_dir


def path(p: Path) -> dict:
    return {"path": str(p), "hash": "sha256:x"}


@pytest.fixture
def outputs(tmp_path) -> Path:
    """data -> pretrain (evaluated) -> finetune lora (evaluated, gated) and full (not evaluated);
    lora -> optimize int8 -> serve; a cost run over the lora chain."""
    out = tmp_path / "outputs"
    data = manifest(out / "data" / "d1", "data", {"data/train_tokens": 1000}, {})
    pre = manifest(out / "pretrain" / "p1", "pretrain", {"val/ppl": 120.0, "train/mfu": 0.4},
                   {"data": path(data)}, created="2026-11-01T09:00:00+0000")
    manifest(out / "evaluate" / "e_base", "evaluate", {"eval/domain/ppl": 178.0, "gate": None},
             {"target": {"model": path(pre / "model")}, "data": path(data)})
    lora = manifest(out / "finetune" / "multirun" / "m" / "0", "finetune",
                    {"finetune/strategy": "lora", "finetune/val_loss_after": 4.9, "train/mfu": 0.3},
                    {"base": path(pre / "model"), "data": path(data / "instruct")}, name="sweep")
    full = manifest(out / "finetune" / "multirun" / "m" / "1", "finetune",
                    {"finetune/strategy": "full", "finetune/val_loss_after": 4.5},
                    {"base": path(pre / "model"), "data": path(data / "instruct")}, created="2026-12-02T09:00:00+0000",
                    name="sweep")
    manifest(out / "evaluate" / "e_lora", "evaluate", {"eval/domain/ppl": 146.0, "gate": {"verdict": "pass"}},
             {"target": {"adapter": path(lora / "adapter"), "base": path(pre / "model")}, "data": path(data),
              "incumbent": {"path": str(out / "evaluate" / "e_base")}})
    opt = manifest(out / "optimize" / "o1", "optimize", {"optimize/size_mb": 13.7},
                   {"source": path(lora / "merged")})
    manifest(out / "serve" / "s1", "serve", {"serve/ttft_ms_p99": 42.0}, {"model": path(opt / "int8")})
    manifest(out / "cost" / "c1", "cost", {"cost/total_usd": 513.6},
             {"data": path(data), "pretrain": path(pre), "finetune": path(lora)})
    (lora / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "train/loss": 5.0}, {"step": 2, "train/loss": 4.8}, {"step": 2, "val/loss": 4.9}]))
    os.symlink("multirun/m/0", out / "finetune" / "latest")  # links are not runs of their own
    return out


def compare(outputs: Path, *overrides: str) -> tuple[dict, list[dict], Path]:
    run_dir = outputs / "compare" / "c"
    metrics = run(make_cfg("compare", run_dir, ["logger=none", *overrides]))
    with open(run_dir / "compare.csv") as f:
        return metrics, list(csv.DictReader(f)), run_dir


def test_rows_are_joined_by_lineage(outputs):
    metrics, rows, run_dir = compare(outputs)
    by_run = {r["run"]: r for r in rows}
    assert metrics["compare/rows"] == 4 and len(by_run) == 4  # pretrain, lora, full, optimize; latest not twice
    lora = by_run["finetune/multirun/m/0"]
    assert lora["strategy"] == "lora" and lora["lineage"] == "pretrain:p1 <- data:d1"
    assert lora["pretrain/val/ppl"] == "120.0" and lora["data/train_tokens"] == "1000"
    assert lora["eval/domain/ppl"] == "146.0" and lora["eval/gate"] == "pass"  # its own evaluation, not the base's
    assert lora["cost/total_usd"] == "513.6" and lora["finetune/train/mfu"] == "0.3"
    assert by_run["finetune/multirun/m/1"]["eval/domain/ppl"] == ""  # never evaluated: nothing inherited
    assert by_run["pretrain/p1"]["eval/domain/ppl"] == "178.0"
    variant = by_run["optimize/o1"]
    assert variant["lineage"] == "finetune:0 <- pretrain:p1 <- data:d1"
    assert variant["finetune/val_loss_after"] == "4.9" and variant["serve/ttft_ms_p99"] == "42.0"
    assert (run_dir / "loss.png").stat().st_size > 0 and (run_dir / "bars.png").stat().st_size > 0
    assert "| finetune/multirun/m/0 | lora |" in (run_dir / "compare.md").read_text()


@pytest.mark.parametrize("overrides, expected", [
    (["filters.stage=finetune"], {"finetune/multirun/m/0", "finetune/multirun/m/1"}),
    (["filters.strategy=lora"], {"finetune/multirun/m/0"}),
    (["filters.group=sweep", "filters.since=2026-12-01"], {"finetune/multirun/m/1"}),
    (["filters.until=2026-11-02"], {"pretrain/p1"}),
    (["filters.glob=optimize/*"], {"optimize/o1"}),
])
def test_filters(outputs, overrides, expected):
    _, rows, _ = compare(outputs, *overrides)
    assert {r["run"] for r in rows} == expected


def test_no_match_names_the_filters(outputs):
    with pytest.raises(LifecycleError, match=r"no runs match filters.stage=finetune, filters.strategy=adapter "
                                             r"\(runs found under .*: 1 cost, 1 data, 2 evaluate, 2 finetune"):
        compare(outputs, "filters.stage=finetune", "filters.strategy=adapter")
    assert not (outputs / "compare" / "c").exists()


def test_wandb_source_needs_a_key(outputs, monkeypatch):
    from lifecycle.errors import ConfigError

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="backend=wandb .* needs WANDB_API_KEY"):
        compare(outputs, "backend=wandb")


def test_an_unreachable_wandb_api_is_one_clear_error(outputs, monkeypatch):
    import wandb

    def refuse(*args, **kwargs):
        raise ConnectionError("connection refused")

    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    monkeypatch.setattr(wandb, "Api", refuse)
    with pytest.raises(LifecycleError, match="W&B API .* is unreachable .*ConnectionError.*backend=local"):
        compare(outputs, "backend=wandb")
