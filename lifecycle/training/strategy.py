"""Fine-tuning strategies: which parameters train. `full` trains all; PEFT strategies join here."""
from __future__ import annotations

import torch


def full():
    """Train every parameter."""
    def apply(model: torch.nn.Module) -> torch.nn.Module:
        model.requires_grad_(True)
        return model
    return apply
