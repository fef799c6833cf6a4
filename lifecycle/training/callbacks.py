"""Callbacks: throughput and MFU, and a plain metrics history next to the run's manifest."""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lifecycle.hardware import compute_dtype, measure_peak_flops


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Throughput(Callback):
    """Tokens/s and MFU per optimizer step (validation excluded); one JSON line per step in metrics.jsonl."""

    def __init__(self, flops_per_token: int, peak_flops: float | None, history: Path, precision: str = "32-true"):
        self.flops_per_token, self.peak_flops, self.history = flops_per_token, peak_flops, Path(history)
        self.precision = precision
        self._t0: float | None = None
        self._tokens, self._losses, self._last_step = 0, [], -1
        self.total_tokens, self.total_seconds, self.steps = 0, 0.0, 0
        self.seen_tokens = 0  # every step's tokens (padding included): D in the 6·N·D FLOPs of `lifecycle cost`

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.peak_flops is None:
            self.peak_flops = measure_peak_flops(pl_module.device, compute_dtype(self.precision))
        self._last_step, self.world = trainer.global_step, trainer.world_size

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._tokens += batch["input_ids"].numel() * trainer.world_size
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(float(loss))
        if trainer.global_step == self._last_step:
            return  # still accumulating gradients
        seconds = time.perf_counter() - self._t0
        tokens_per_s = self._tokens / seconds
        mfu = tokens_per_s * self.flops_per_token / (self.peak_flops * trainer.world_size)
        self.seen_tokens += self._tokens
        if self.steps > 0:  # the first step carries one-off warm-up costs
            self.total_tokens += self._tokens
            self.total_seconds += seconds
        self.steps += 1
        pl_module.log_dict({"train/tokens_per_s": tokens_per_s, "train/mfu": mfu}, prog_bar=False)
        row = {"step": trainer.global_step,
               "train/loss": sum(self._losses) / len(self._losses) if self._losses else None,
               "train/lr": trainer.optimizers[0].param_groups[0]["lr"],
               "train/tokens_per_s": round(tokens_per_s, 1), "train/mfu": round(mfu, 4)}
        self._write(trainer, row)
        # The next step's clock starts now, so loading its batch counts; validation restarts it.
        self._t0, self._tokens, self._losses, self._last_step = time.perf_counter(), 0, [], trainer.global_step

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = None
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return  # the final trainer.validate() is reported in the manifest
        m = trainer.callback_metrics
        self._write(trainer, {"step": trainer.global_step, **{k: float(m[k]) for k in ("val/loss", "val/ppl")
                                                              if k in m}})

    def _write(self, trainer: Trainer, row: dict) -> None:
        if trainer.is_global_zero:
            with open(self.history, "a") as f:
                f.write(json.dumps(row) + "\n")

    def summary(self, device: torch.device) -> dict[str, float]:
        tokens_per_s = self.total_tokens / self.total_seconds if self.total_seconds else float("nan")
        return {"train/tokens_per_s": round(tokens_per_s, 1), "train/tokens": self.seen_tokens,
                "train/mfu": round(tokens_per_s * self.flops_per_token / (self.peak_flops * self.world), 4),
                "train/peak_flops": self.peak_flops, "train/peak_mem_mb": round(peak_memory_mb(device), 1)}
