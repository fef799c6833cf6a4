"""Bottleneck adapters and the one adapter loader, checked against PEFT's behaviour on tiny models."""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lifecycle.errors import CheckpointError, ConfigError
from lifecycle.models.adapters import is_adapter_dir, load_adapter
from lifecycle.training.bottleneck import BottleneckConfig, add_bottleneck, load_bottleneck, save_bottleneck

TOKENS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def llama(hidden_size: int = 32):
    torch.manual_seed(0)  # every call builds the same weights: a "fresh copy of the base"
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden_size, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64)).eval()


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)).eval()


def config(**changes) -> BottleneckConfig:
    return BottleneckConfig(**{"bottleneck_size": 8, "non_linearity": "silu", "dropout": 0.0,
                               "target_modules": ["o_proj", "down_proj"], "scaling": 1.0, **changes})


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def perturb(model, adapter_name: str, seed: int) -> None:
    """Random `up` weights: an adapter that has learned something, without spending time on training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"adapter_up.{adapter_name}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("build, targets, wrapped", [
    (llama, ["o_proj", "down_proj"], ["self_attn.o_proj", "mlp.down_proj"]),
    (gpt2, ["c_proj"], ["attn.c_proj", "mlp.c_proj"]),  # GPT-2's Conv1D, after attention and after the MLP
])
def test_zero_init_is_exactly_the_base(build, targets, wrapped):
    model = build()
    base = logits(model)
    adapted = add_bottleneck(model, config(target_modules=targets))
    assert torch.equal(logits(adapted), base)
    assert sorted(".".join(name.split(".")[-2:]) for name in adapted.targeted_module_names) == sorted(wrapped * 2)


@pytest.mark.parametrize("build, targets, size, features, modules", [
    (llama, ["o_proj", "down_proj"], 8, 32, 4),
    (gpt2, ["c_proj"], 4, 32, 4),
])
def test_only_adapter_weights_train_and_count_as_the_math_says(build, targets, size, features, modules):
    adapted = add_bottleneck(build(), config(target_modules=targets, bottleneck_size=size))
    trainable = {name: p.numel() for name, p in adapted.named_parameters() if p.requires_grad}
    # down: features x size + size bias, up: size x features + features bias, per wrapped module
    assert sum(trainable.values()) == modules * (2 * features * size + size + features)
    assert all(".adapter_down.default." in name or ".adapter_up.default." in name for name in trainable)


def test_training_moves_the_adapter_and_leaves_the_base_bit_identical():
    model = llama()
    base_logits = logits(model)
    base = {id(p): p.detach().clone() for p in model.parameters()}
    adapted = add_bottleneck(model, config(dropout=0.1)).train()
    start = {name: p.detach().clone() for name, p in adapted.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # step 1 moves only `up` (down's gradient is zero while up is); later steps move both
        adapted(TOKENS, labels=TOKENS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in adapted.named_parameters():
        if id(p) in base:
            assert torch.equal(p, base[id(p)]), name
        else:
            assert not torch.equal(p, start[name]), name
    assert not torch.allclose(logits(adapted.eval()), base_logits)


def test_save_and_load_into_a_fresh_base_gives_identical_logits(tmp_path):
    adapted = add_bottleneck(llama(), config())
    perturb(adapted, "default", seed=1)
    want = logits(adapted)
    assert not is_adapter_dir(tmp_path)
    save_bottleneck(adapted, tmp_path)
    assert is_adapter_dir(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK"
    assert saved["base_model_fingerprint"] == {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
                                               "vocab_size": 64}
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.o_proj.adapter_down.weight" in keys  # PEFT's naming
    assert len(keys) == 2 * 2 * 4 and not any("default" in key for key in keys)

    loaded = load_adapter(llama(), tmp_path)
    assert torch.equal(logits(loaded), want)
    assert not any(p.requires_grad for p in loaded.parameters())  # frozen on load, as PeftModel.from_pretrained


def test_named_adapters_switch_disable_and_load_side_by_side(tmp_path):
    base = logits(llama())
    adapted = add_bottleneck(llama(), config(), adapter_name="a")
    perturb(adapted, "a", seed=1)
    add_bottleneck(adapted, config(bottleneck_size=4, non_linearity="relu"), adapter_name="b")
    perturb(adapted, "b", seed=2)
    assert adapted.active_adapters == ["a"]  # adding an adapter does not activate it (PEFT's rule)
    out_a = logits(adapted)
    adapted.set_adapter("b")
    out_b = logits(adapted)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_b, base)
    assert all(".b." in name for name, p in adapted.named_parameters() if p.requires_grad)
    with adapted.disable_adapter():
        assert torch.equal(logits(adapted), base)
    assert torch.equal(logits(adapted), out_b)
    with pytest.raises(ConfigError, match="'b' exists already"):
        add_bottleneck(adapted, config(), adapter_name="b")

    save_bottleneck(adapted, tmp_path / "a", "a")
    save_bottleneck(adapted, tmp_path / "b", "b")
    both = load_adapter(load_adapter(llama(), tmp_path / "a", "a"), tmp_path / "b", "b")
    assert torch.equal(logits(both), out_a)
    both.set_adapter("b")
    assert torch.equal(logits(both), out_b)
    both.disable_adapter_layers()
    assert torch.equal(logits(both), base)


def test_missing_target_modules_name_the_valid_ones():
    with pytest.raises(ConfigError, match=r"target_modules=\['o_proj'\].*GPT2LMHeadModel.*'c_attn', 'c_fc', 'c_proj'"):
        add_bottleneck(gpt2(), config(target_modules=["o_proj"]))
    with pytest.raises(ConfigError, match="non_linearity='tanh'"):
        config(non_linearity="tanh")


def test_merging_is_refused_and_unload_returns_the_base():
    base = logits(llama())
    adapted = add_bottleneck(llama(), config())
    perturb(adapted, "default", seed=1)
    with pytest.raises(ConfigError, match="cannot be merged"):
        adapted.merge_and_unload()
    assert torch.equal(logits(adapted.unload()), base)


def test_an_adapter_from_another_base_is_refused_naming_both(tmp_path):
    save_bottleneck(add_bottleneck(llama(), config()), tmp_path / "ours")
    with pytest.raises(CheckpointError, match=r"ours was trained on base .*given base .*hidden_size 32 vs 48"):
        load_adapter(llama(hidden_size=48), tmp_path / "ours")
    lora = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(CheckpointError, match=r"lora was trained on .*q_proj has 48 in features, the adapter 32"):
        load_adapter(llama(hidden_size=48), tmp_path / "lora")


def test_a_peft_lora_adapter_loads_through_the_same_loader(tmp_path):
    lora = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    want = logits(lora)
    assert not torch.allclose(want, logits(llama()))
    lora.save_pretrained(tmp_path)
    assert torch.equal(logits(load_adapter(llama(), tmp_path)), want)


def test_pickled_weights_are_refused(tmp_path):
    save_bottleneck(add_bottleneck(llama(), config()), tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="only a pickled adapter_model.bin.*safetensors is required"):
        load_adapter(llama(), tmp_path)
    with pytest.raises(CheckpointError, match="only a pickled adapter_model.bin"):
        load_bottleneck(llama(), tmp_path)
