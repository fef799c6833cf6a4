"""CausalLM: the configured fused AdamW (unfused where a GradScaler must clip)."""
from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lifecycle.training.module import CausalLM
from lifecycle.training.schedule import warmup_cosine

ROOT = Path(__file__).resolve().parents[2]


def tiny_module(model: torch.nn.Module | None = None) -> CausalLM:
    model = model or torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
    optimizer = instantiate(OmegaConf.load(ROOT / "conf/optimizer/adamw.yaml"))
    return CausalLM(model, optimizer, functools.partial(warmup_cosine, warmup_steps=1, total_steps=10,
                                                        min_lr_ratio=0.1))


@pytest.mark.parametrize("precision, clip, fused", [("32-true", 1.0, True), ("bf16-mixed", 1.0, True),
                                                    ("16-mixed", 1.0, False), ("16-mixed", None, True)])
def test_fused_adamw_unless_a_grad_scaler_clips(precision, clip, fused):
    module = tiny_module()
    module.trainer = SimpleNamespace(precision=precision, gradient_clip_val=clip)
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is fused
    assert optimizer.defaults["lr"] == 1e-3 and [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_fused_step_matches_the_loop_implementation():
    torch.manual_seed(0)
    start, grads = [torch.randn(4, 3) for _ in range(2)], [torch.randn(4, 3) for _ in range(2)]
    params = {impl: [torch.nn.Parameter(p.clone()) for p in start] for impl in ("fused", "loop")}
    for impl, ps in params.items():
        opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=impl == "fused")
        for _ in range(3):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(params["fused"], params["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

