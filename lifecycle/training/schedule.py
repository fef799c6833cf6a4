"""Learning-rate schedules: linear warm-up, then cosine or linear decay (Hydra `_partial_` targets)."""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class _WarmupDecay:
    """LR multiplier at `step`; a picklable object so the scheduler state saves with the checkpoint."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float, shape: str):
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.min_lr_ratio, self.shape = min_lr_ratio, shape

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.shape == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * decay


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> LambdaLR:
    return LambdaLR(optimizer, _WarmupDecay(warmup_steps, total_steps, min_lr_ratio, "cosine"))


def warmup_linear(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> LambdaLR:
    return LambdaLR(optimizer, _WarmupDecay(warmup_steps, total_steps, min_lr_ratio, "linear"))
