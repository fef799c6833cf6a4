"""What `lifecycle cost` reads from finished runs: training params, tokens, MFU and durations, the data run's
processing time, the fine-tuning examples and the serving throughput. Only measured figures, each with its source."""
from __future__ import annotations

import json
from pathlib import Path

from lifecycle.cost.figures import Figures

SERVING_HINT = ("no serving measurement: run benchmarks/serve_load.py (its JSON: serving.benchmark=PATH) or "
                "`lifecycle serve` (serving.run=RUN_DIR)")


def manifest(run_dir: str | None, stage: str) -> tuple[Path | None, dict | None, str]:
    """(run dir, its manifest, '') or (None, None, why there is none)."""
    if not run_dir:
        return None, None, f"no {stage} run given (runs.{stage}=null)"
    path = Path(run_dir).resolve() / "manifest.json"
    if not path.is_file():
        return None, None, f"no finished {stage} run at {run_dir} (no manifest.json): run `lifecycle {stage}`"
    m = json.loads(path.read_text())
    if m.get("stage") != stage:
        return None, None, f"{run_dir} is a `{m.get('stage')}` run, not `{stage}`"
    return path.parent, m, ""


def training(fig: Figures, stage: str, run_dir: Path | None, m: dict | None, why: str) -> None:
    """{stage}/params, tokens, mfu, peak_flops_measured and wall_hours of a pretrain or finetune run."""
    keys = ("params", "tokens", "mfu", "peak_flops_measured", "wall_hours")
    if m is None:
        for k in keys:
            fig.miss(f"{stage}/{k}", why)
        return
    x, src = m["metrics"], f"{run_dir}/manifest.json"
    params, params_src = _params(stage, x)
    if params is None:
        fig.miss(f"{stage}/params", params_src)
    else:
        fig.put(f"{stage}/params", params, f"{params_src} ({src})")
    tokens, tokens_src = _tokens(stage, x, m["config"])
    if tokens is None:
        fig.miss(f"{stage}/tokens", tokens_src)
    else:
        fig.put(f"{stage}/tokens", tokens, f"{tokens_src} ({src})")
    for key, metric in (("mfu", "train/mfu"), ("peak_flops_measured", "train/peak_flops")):
        _put_metric(fig, f"{stage}/{key}", x, metric, src)
    devices = _world(m["config"])
    fig.put(f"{stage}/wall_hours", m["duration_s"] * devices / 3600,
            f"duration_s {m['duration_s']} x {devices} device(s) ({src})")


def data(fig: Figures, run_dir: Path | None, m: dict | None, why: str) -> None:
    """data/wall_hours: the data stage's measured processing time."""
    if m is None:
        fig.miss("data/wall_hours", why)
        return
    fig.put("data/wall_hours", m["duration_s"] / 3600, f"duration_s {m['duration_s']} ({run_dir}/manifest.json)")


def examples(fig: Figures, run_dir: Path | None, m: dict | None, why: str) -> None:
    """finetune/examples: the instruction examples the fine-tuning run trained on (what labelling pays for)."""
    if m is None:
        fig.miss("finetune/examples", why)
        return
    _put_metric(fig, "finetune/examples", m["metrics"], "finetune/train_examples", f"{run_dir}/manifest.json")


def serving(fig: Figures, run: str | None, benchmark: str | None, throughput_key: str, latency_key: str) -> None:
    """serve/tokens_per_s (and the latency) from a serving benchmark JSON or a `lifecycle serve` run's manifest."""
    metrics, src = _serving_metrics(run, benchmark)
    if metrics is None:
        fig.miss("serve/tokens_per_s", src)
        fig.miss("serve/latency_ms", src)
        return
    if not _put_metric(fig, "serve/tokens_per_s", metrics, throughput_key, src):
        fig.miss("serve/tokens_per_s", f"{src} has no {throughput_key} (set serving.throughput_key); {SERVING_HINT}")
    _put_metric(fig, "serve/latency_ms", metrics, latency_key, src)


def _serving_metrics(run: str | None, benchmark: str | None) -> tuple[dict | None, str]:
    if benchmark:
        path = Path(benchmark)
        if not path.is_file():
            return None, f"{SERVING_HINT} (serving.benchmark={benchmark}: no such file)"
        data = json.loads(path.read_text())
        return data.get("metrics", data), str(path.resolve())
    run_dir, m, why = manifest(run, "serve")
    if m is None:
        return None, f"{SERVING_HINT} ({why.split(':')[0]})"
    return m["metrics"], f"{run_dir}/manifest.json"


def _put_metric(fig: Figures, key: str, metrics: dict, metric: str, src: str) -> bool:
    value = _lookup(metrics, metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:  # NaN: not measured
        fig.miss(key, f"{metric} not in {src}")
        return False
    fig.put(key, float(value), f"{metric} ({src})")
    return True


def _lookup(metrics: dict, key: str):
    """metrics[key], else the nested value a dotted key names (runs.engine_concurrent8.tokens_per_s in a JSON)."""
    if key in metrics:
        return metrics[key]
    node = metrics
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _params(stage: str, x: dict) -> tuple[float | None, str]:
    if stage == "pretrain" and x.get("train/params"):
        return float(x["train/params"]), "train/params"
    trainable, share = x.get("finetune/trainable_params"), x.get("finetune/trainable_share")
    if trainable and share:  # every weight takes part in the forward and backward pass, frozen or not
        return round(trainable / share), "finetune/trainable_params / finetune/trainable_share"
    return None, "no parameter count in the manifest (train/params or finetune/trainable_params)"


def _tokens(stage: str, x: dict, config: dict) -> tuple[float | None, str]:
    if x.get("train/tokens"):
        return float(x["train/tokens"]), "train/tokens"
    if stage == "pretrain":  # packed shards: every batch is full, so tokens = steps x batch x seq_len exactly
        d, t = config["data"], config["trainer"]
        per_step = d["batch_size"] * d["seq_len"] * t["accumulate_grad_batches"] * _world(config)
        return float(x["train/steps"] * per_step), "train/steps x batch_size x seq_len x accumulation x devices"
    return None, "train/tokens not in the manifest (a run from before it was recorded): re-run `lifecycle finetune`"


def _world(config: dict) -> int:
    t = config.get("trainer", {})
    devices = t.get("devices", 1)
    return (devices if isinstance(devices, int) else 1) * t.get("num_nodes", 1)
