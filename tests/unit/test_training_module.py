"""CausalLM: the configured fused AdamW (unfused where a GradScaler must clip), and the training loss computed
without the full logits, equal to the plain one."""
from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lifecycle.models.build import gpt2, llama
from lifecycle.training import loss
from lifecycle.training.module import IGNORE, CausalLM
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


def tiny_llama():
    return llama(64, 2, 4, 4, 128, 256, 1e4, 0.0, True, vocab_size=300, bos_token_id=0, eos_token_id=0,
                 pad_token_id=1)


def tiny_gpt2():
    return gpt2(64, 2, 4, 256, 0.0, True, vocab_size=300, bos_token_id=0, eos_token_id=0, pad_token_id=1)


def tiny_auto(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        model_type, vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, *(functools.partial(tiny_auto, t)  # untied heads too
                                                            for t in loss.PLAIN_HEAD_MODEL_TYPES if t != "gpt2")])
def test_training_loss_without_full_logits_equals_the_plain_one(build, monkeypatch):
    monkeypatch.setattr(loss, "CHUNK_LOGITS_BYTES", 16 * 4 * 300)  # 64 rows: several chunks and a ragged last one
    torch.manual_seed(0)
    model = build()
    batch = {"input_ids": torch.randint(0, 300, (3, 40))}
    batch["labels"] = torch.roll(batch["input_ids"], -1, 1)
    batch["labels"][0, :7] = IGNORE  # a prompt that is not scored
    fused, plain = tiny_module(model), tiny_module(model)
    assert fused._head is not None  # the path without full logits applies to this architecture
    plain._head = None
    losses, grads = [], []
    for module in (fused, plain):
        model.zero_grad()
        value = module.train_loss(batch)
        value.backward()
        losses.append(value.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, rtol=1e-4, atol=1e-7)


def test_no_fused_loss_for_other_heads_or_a_teacher():
    model = tiny_llama()
    assert loss.plain_head(torch.nn.Linear(2, 2)) is None
    assert tiny_module(model)._head is not None
    assert CausalLM(model, None, None, teacher=tiny_llama())._head is None
    model.config.model_type = "gemma2"  # soft-capped logits: not a plain projection
    assert loss.plain_head(model) is None


def test_compile_is_in_place_and_keeps_checkpoint_keys():
    model = tiny_llama()
    keys = list(CausalLM(model, None, None).state_dict())
    module = CausalLM(model, None, None, compile=True)
    assert model.model._compiled_call_impl is not None  # the decoder the training loss calls
    assert list(module.state_dict()) == keys
