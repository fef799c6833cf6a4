"""benchmarks/gpu.py, the prepared run of issue 10's GPU goals: on the CPU with a small model it trains, decodes and
writes its figures; asked for CUDA where there is none, it stops with a message that says what to do."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks/gpu.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def test_the_small_cpu_run_trains_decodes_and_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--steps", "5", "--warmup", "2",
                           "--batch-size", "2", "--seq-len", "64", "--new-tokens", "6", "--out", str(out)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    b1, b2 = result["b1"], result["b2"]
    assert b1["precision"] == "32-true" and b1["batch"] == [2, 64] and b1["params"] < 2_000_000
    assert b1["tokens_per_s"] > 0 and 0 < b1["mfu"] < 1.5 and all(map(math.isfinite, b1["loss_first_last"]))
    assert set(b2["tokens_per_s"]) == {"ours_b1", "hf_eager_b1"} and min(b2["tokens_per_s"].values()) > 0
    for run, rate in b2["tokens_per_s"].items():  # the bandwidth figures follow from the rates and the bytes
        assert b2["used_GBps"][run] == pytest.approx(rate * b2["weight_bytes_per_token"] / 1e9, rel=0.02, abs=0.06)
    assert "B1 train" in done.stdout and "B2 goal 60%" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_without_cuda_it_stops_and_says_how_to_check_the_script(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "gpu.json")], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "no CUDA device here" in done.stderr and "--device cpu --tiny" in done.stderr
    assert not (tmp_path / "gpu.json").exists()
