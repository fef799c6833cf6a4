"""Warm-up then decay, as configured."""
import pytest
import torch

from lifecycle.training.schedule import warmup_cosine, warmup_linear


def lrs(factory, steps, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = factory(opt, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_warmup_peak_and_floor():
    out = lrs(warmup_cosine, 110, warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
    assert out[0] == pytest.approx(0.1) and out[9] == pytest.approx(1.0)
    assert out[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)
    assert out[100] == pytest.approx(0.1) and out[109] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(out[9:100], out[10:100]))


def test_linear_decays_to_zero():
    out = lrs(warmup_linear, 21, warmup_steps=0, total_steps=20, min_lr_ratio=0.0)
    assert out[0] == pytest.approx(1.0) and out[10] == pytest.approx(0.5) and out[20] == pytest.approx(0.0)
