"""`lifecycle pipeline experiment=smoke` end to end, with W&B offline and a W&B key that must leak nowhere."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import cli, make_cfg

pytestmark = pytest.mark.integration
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 characters, the shape of a real W&B key


def test_smoke_pipeline_with_wandb_offline_leaks_no_key(tmp_path):
    out = cli("lifecycle.pipeline", f"paths.output_root={tmp_path}", f"hydra.run.dir={tmp_path / 'pipeline' / 'p'}",
              "experiment=smoke", "logger=wandb", 'steps.data.overrides=["max_bytes=400000"]',
              env={"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "offline"}, timeout=1200)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    manifest = json.loads((tmp_path / "pipeline" / "p" / "manifest.json").read_text())
    stages = manifest["metrics"]["steps"]
    assert list(stages)[:5] == ["data", "pretrain", "evaluate_base", "finetune", "evaluate_tuned"]
    assert list(stages)[-1] == "cost"
    assert manifest["metrics"]["gates"]["evaluate_tuned"] in ("pass", "fail")
    pretrain_dir = Path(stages["pretrain"]["run_dir"])
    assert (tmp_path / "pretrain" / "latest").resolve() == pretrain_dir
    pre = json.loads((pretrain_dir / "manifest.json").read_text())
    assert pre["inputs"]["data"]["path"] == stages["data"]["run_dir"]
    assert pre["wandb_run_id"] and list((pretrain_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert pre["config"]["name"] == "smoke"
    fine = json.loads((Path(stages["finetune"]["run_dir"]) / "manifest.json").read_text())
    assert fine["config"]["base"]["name_or_path"] == str(pretrain_dir / "model")
    assert fine["metrics"]["finetune/val_loss_after"] < fine["metrics"]["finetune/val_loss_before"]

    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert not leaks, f"the W&B key was written to {leaks}"
    check_cost_and_compare(tmp_path, stages)


def check_cost_and_compare(tmp_path: Path, stages: dict) -> None:
    """The pipeline's cost step priced its own runs; compare joins them by lineage."""
    from lifecycle.compare.stage import run as compare

    cost = json.loads((Path(stages["cost"]["run_dir"]) / "manifest.json").read_text())["metrics"]
    assert cost["cost/pretrain/usd"] > 0 and cost["cost/finetune/usd"] > 0 and cost["projection/usd"] > 0
    for key in ("cost/inference/usd_per_1k", "cost/roi"):  # present, or missing with the reason
        assert (cost[key] is None) == (key in cost["missing"])
    compare(make_cfg("compare", tmp_path / "compare" / "c", ["filters.stage=finetune", "logger=none"]))
    with open(tmp_path / "compare" / "c" / "compare.csv") as f:
        [row] = list(csv.DictReader(f))
    assert row["run"] == str(Path(stages["finetune"]["run_dir"]).relative_to(tmp_path))
    assert row["lineage"].startswith("pretrain:") and row["eval/gate"] in ("pass", "fail")
    assert float(row["cost/pretrain/usd"]) > 0


def test_failed_stage_stops_the_pipeline_and_keeps_latest(tmp_path):
    out = cli("lifecycle.pipeline", f"paths.output_root={tmp_path}", "experiment=smoke",
              'steps.data.overrides=["source=[files]","sources.files.path=/nonexistent/docs"]', timeout=300)
    assert out.returncode != 0
    assert "path '/nonexistent/docs' does not exist" in out.stderr
    assert "step `data` (lifecycle data) failed" in out.stderr
    assert not (tmp_path / "data" / "latest").exists() and not (tmp_path / "pretrain").exists()
