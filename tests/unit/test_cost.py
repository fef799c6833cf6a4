"""`lifecycle cost` on fabricated manifests: the arithmetic against hand-computed figures, MISSION.md's ROI and
payback, missing measurements reported as missing, a missing price, per-key bills from a real usage database."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from lifecycle.cost import estimate
from lifecycle.cost.stage import run
from lifecycle.cost.whatif import WhatIfTable
from lifecycle.config import validate
from lifecycle.errors import ConfigError

from conftest import make_cfg

# $1/h for training on `hardware` and $2/h on the machine the runs (data, serving) were measured on.
PRICES = ["hardware.usd_per_hour=1.0", "measured_on.usd_per_hour=2.0", "business.labelling_usd_per_example=0.5",
          "business.revenue_increase_usd_per_year=1000", "business.cost_savings_usd_per_year=500",
          "business.efficiency_gain_usd_per_year=0", "business.requests_per_month=1000",
          "business.tokens_per_request=200", "projection.params=1e9", "projection.tokens=1e10",
          "projection.devices=4"]


def manifest(run_dir: Path, stage: str, metrics: dict, duration_s: float, inputs: dict | None = None,
             config: dict | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "manifest.json").write_text(json.dumps({
        "stage": stage, "created": "2026-11-29T10:00:00+0000", "duration_s": duration_s, "inputs": inputs or {},
        "metrics": metrics, "config": {"name": "t", "trainer": {"devices": 1, "num_nodes": 1}, **(config or {})}}))
    return run_dir


@pytest.fixture
def runs(tmp_path) -> dict[str, Path]:
    """data (6 min) -> pretrain (N=1e6, D=1e6, MFU 0.5, peak 1e11) -> finetune (N=1e6, D=5e5, MFU 0.25), serving."""
    out = tmp_path / "outputs"
    data = manifest(out / "data" / "d", "data", {"data/train_tokens": 10**6}, 360)
    pre = manifest(out / "pretrain" / "p", "pretrain", {"train/params": 10**6, "train/tokens": 10**6,
                   "train/mfu": 0.5, "train/peak_flops": 1e11}, 3600, {"data": {"path": str(data)}})
    fine = manifest(out / "finetune" / "f", "finetune", {
        "finetune/trainable_params": 10**5, "finetune/trainable_share": 0.1, "train/tokens": 5 * 10**5,
        "train/mfu": 0.25, "train/peak_flops": 1e11, "finetune/train_examples": 1000}, 1800,
        {"base": {"path": str(pre / "model")}})
    bench = tmp_path / "serve_load.json"
    bench.write_text(json.dumps({"metrics": {"serve/tokens_per_s": 100.0, "serve/latency_ms_p50": 80.0}}))
    return {"out": out, "data": data, "pretrain": pre, "finetune": fine, "bench": bench}


def cost_cfg(runs: dict, *overrides: str):
    return make_cfg("cost", runs["out"] / "cost" / "c", [
        "logger=none", f"runs.pretrain={runs['pretrain']}", f"runs.finetune={runs['finetune']}", *PRICES, *overrides])


def test_figures_match_hand_computed_ones(runs):
    m = run(cost_cfg(runs, f"serving.benchmark={runs['bench']}"))
    # pretrain: 6 * 1e6 * 1e6 = 6e12 FLOPs / (0.5 * 1e11 FLOP/s) = 120 s = 1/30 h at $1/h
    assert m["cost/pretrain/flops"] == pytest.approx(6e12)
    assert m["cost/pretrain/usd"] == pytest.approx(1 / 30)
    # finetune: N = 1e5 / 0.1; 6 * 1e6 * 5e5 = 3e12 / (0.25 * 1e11) = 120 s -> $1/30; labelling 1000 * $0.5
    assert m["cost/finetune/usd"] == pytest.approx(1 / 30)
    assert m["cost/finetuning_usd"] == pytest.approx(1 / 30 + 500)
    # data: 360 s = 0.1 h at $2/h (found through the pretrain run's inputs)
    assert m["cost/pretraining_usd"] == pytest.approx(0.2 + 1 / 30)
    # serving: $2/h / (100 tok/s * 3600) * 1000; 1000 requests * 200 tokens a month; 12 months
    assert m["cost/inference/usd_per_1k"] == pytest.approx(2 / 360)
    assert m["cost/inference/usd_per_month"] == pytest.approx(2 / 360 * 200)
    total = 0.2 + 1 / 30 + 1 / 30 + 500 + 12 * 2 / 360 * 200
    assert m["cost/total_usd"] == pytest.approx(total) and total == pytest.approx(513.6)
    assert m["cost/benefit_usd"] == 1500
    assert m["cost/roi"] == pytest.approx((1500 - 513.6) / 513.6)
    assert m["cost/payback_months"] == pytest.approx(513.6 / 125)
    # projection: 6 * 1e9 * 1e10 = 6e19 / (0.5 * the measured 1e11) / 3600 h, on 4 devices
    assert m["projection/device_hours"] == pytest.approx(6e19 / 5e10 / 3600)
    assert m["projection/usd"] == pytest.approx(6e19 / 5e10 / 3600)
    assert m["projection/days"] == pytest.approx(6e19 / 5e10 / 3600 / 4 / 24)
    report = json.loads((runs["out"] / "cost" / "c" / "cost.json").read_text())
    assert report["missing"] == {} and (runs["out"] / "cost" / "c" / "cost.png").stat().st_size > 0
    assert "cost/total_usd" in (runs["out"] / "cost" / "c" / "cost.md").read_text()


def test_datasheet_peak_of_the_chosen_hardware_is_used(runs):
    m = run(cost_cfg(runs, "cost/hardware=h100", "hardware.usd_per_hour=1.0"))
    assert m["hardware"] == "h100"
    assert m["cost/pretrain/usd"] == pytest.approx(6e12 / (0.5 * 989e12) / 3600)


def test_roi_and_payback_formulas():
    assert estimate.roi(benefit=150, cost=100) == pytest.approx(0.5)
    assert estimate.payback_months(cost=120, benefit_per_year=240) == pytest.approx(6)
    assert estimate.usd_per_1k_tokens(3.6, 1000) == pytest.approx(0.001)


def test_missing_measurements_are_reported_not_invented(runs):
    data = json.loads((runs["finetune"] / "manifest.json").read_text())
    del data["metrics"]["train/tokens"]
    (runs["finetune"] / "manifest.json").write_text(json.dumps(data))
    m = run(cost_cfg(runs, f"serving.run={runs['out'] / 'serve' / 'latest'}"))
    missing = json.loads((runs["out"] / "cost" / "c" / "cost.json").read_text())["missing"]
    for key in ("cost/finetune/usd", "cost/inference/usd_per_1k", "cost/total_usd", "cost/roi",
                "cost/payback_months"):
        assert m[key] is None and key in missing
    assert "no serving measurement" in missing["cost/inference/usd_per_1k"]
    assert "train/tokens not in the manifest" in missing["cost/finetune/usd"]
    assert m["cost/pretrain/usd"] == pytest.approx(1 / 30)  # what was measured is still priced


def test_packed_pretraining_tokens_come_from_steps_when_not_recorded(runs):
    data = json.loads((runs["pretrain"] / "manifest.json").read_text())
    del data["metrics"]["train/tokens"]
    data["metrics"]["train/steps"] = 100
    data["config"] |= {"data": {"batch_size": 4, "seq_len": 50}, "trainer": {"devices": 2, "num_nodes": 1,
                                                                             "accumulate_grad_batches": 5}}
    (runs["pretrain"] / "manifest.json").write_text(json.dumps(data))
    m = run(cost_cfg(runs))
    assert m["cost/pretrain/flops"] == pytest.approx(6 * 10**6 * 100 * 4 * 50 * 5 * 2)


def test_a_hardware_profile_without_a_price_is_a_config_error(tmp_path):
    cfg = make_cfg("cost", tmp_path / "cost" / "c", ["cost/hardware=a100", "~hardware.usd_per_hour"])
    with pytest.raises(ConfigError, match=r"usd_per_hour: missing in hardware profile 'a100'"):
        validate(cfg, "cost")


def test_bill_per_key_from_the_usage_meter(runs, tmp_path):
    from lifecycle.serve.usage import UsageMeter, UsageRecord

    db = f"sqlite:///{tmp_path / 'usage.db'}"
    t0 = datetime(2026, 11, 10, tzinfo=timezone.utc).timestamp()
    meter = UsageMeter(db)
    for key, model, prompt, completion, ts in [("k1", "m", 1000, 2000, t0), ("k1", "m", 500, 0, t0 + 60),
                                               ("k1", "big", 1000, 1000, t0), ("k2", "m", 3000, 1000, t0),
                                               ("k2", "m", 10**6, 10**6, t0 - 30 * 86400)]:  # last: before the period
        meter.record(UsageRecord(key, model, "rest", "/v1/completions", 200, prompt, completion, 5.0, ts=ts))
    meter.close()
    cfg = cost_cfg(runs, f"billing.db={db}", "billing.since=2026-11-01", "billing.until=2026-12-01",
                   "billing.prompt_usd_per_1k=0.001", "billing.completion_usd_per_1k=0.002",
                   "+billing.models.big={prompt_usd_per_1k: 0.01, completion_usd_per_1k: 0.02}")
    m = run(cfg)
    bill = json.loads((runs["out"] / "cost" / "c" / "bill.json").read_text())
    # k1: m 1500 prompt, 2000 completion -> 0.0015 + 0.004; big 1000/1000 -> 0.01 + 0.02. k2: 0.003 + 0.002
    assert bill["due"] == pytest.approx({"k1": 0.0355, "k2": 0.005})
    assert m["billing/total_usd"] == pytest.approx(0.0405)
    assert "| k1 | big | 1 |" in (runs["out"] / "cost" / "c" / "bill.md").read_text()


def test_a_missing_usage_database_is_named(runs, tmp_path):
    with pytest.raises(ConfigError, match="no such database file"):
        run(cost_cfg(runs, f"billing.db=sqlite:///{tmp_path / 'nope.db'}"))
    assert not (tmp_path / "nope.db").exists()


def test_whatif_table_has_a_row_per_job(tmp_path, capsys):
    for i, (hw, usd) in enumerate([("a100", 1.5), ("h100", 0.5)]):
        manifest(tmp_path / str(i), "cost", {"hardware": hw, "cost/total_usd": usd, "cost/roi": None}, 1)
    WhatIfTable().on_multirun_end(_cfg(tmp_path))
    lines = (tmp_path / "whatif.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| a100", "| h100"]
    assert "$1.50" in lines[2] and "missing" in lines[2]


def _cfg(sweep: Path):
    from omegaconf import OmegaConf

    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})


def test_serving_throughput_is_read_from_a_nested_benchmark_json(runs, tmp_path):
    bench = tmp_path / "serve_engine.json"
    bench.write_text(json.dumps({"runs": {"engine_concurrent8": {"tokens_per_s": 400.0, "ttft_ms_p50": 9.0}}}))
    m = run(cost_cfg(runs, f"serving.benchmark={bench}", "serving.throughput_key=runs.engine_concurrent8.tokens_per_s"))
    assert m["cost/inference/usd_per_1k"] == pytest.approx(2 / (400 * 3600) * 1000)
