"""LocalEngine's adapters (per request, loaded at start or at runtime inside model_root), chat and load failures."""
from __future__ import annotations

import asyncio
import os
import shutil

import pytest
import torch
from serve_models import (PROMPTS, ask, collect, hf_greedy, ids_of, llama_dir, run, serving, tokenizer,  # noqa: F401
                          tokens)
from transformers import LlamaForCausalLM

from lifecycle.errors import CheckpointError
from lifecycle.serve.engine import LocalEngine
from lifecycle.serve.protocol import EngineError, ModelNotFound, NoChatTemplate
from lifecycle.training.instruct_data import CHAT_TEMPLATE


def test_chat_template_or_a_clear_refusal(llama_dir, tokenizer, tmp_path):
    chat_dir = tmp_path / "chat"
    shutil.copytree(llama_dir, chat_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(chat_dir)
    tokenizer.chat_template = None
    messages = [{"role": "user", "content": "add two numbers"}]

    async def main():
        async with serving(llama_dir) as plain:
            with pytest.raises(NoChatTemplate, match="no chat template"):
                plain.render_chat(messages)
        async with serving(chat_dir) as chat:
            return chat.render_chat(messages), chat.decode(chat.render_chat(messages))

    ids, text = run(main())
    assert text.endswith("<|assistant|>\n") and "add two numbers" in text
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    finally:
        tokenizer.chat_template = None
    assert ids == list(expected)


def test_truncated_weights_fail_start_naming_the_file(llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])

    async def main():
        engine = LocalEngine(str(broken))
        with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
            await engine.start()
        return engine

    engine = run(main())
    assert not engine.ready and "truncated" in str(engine.load_error)


@pytest.fixture(scope="module")
def loras(llama_dir):
    """Two LoRA adapters with random (non-zero) weights, saved under the model root's adapters/."""
    from peft import LoraConfig, get_peft_model

    dirs = {}
    for i, name in enumerate(("a1", "a2")):
        torch.manual_seed(10 + i)
        base = LlamaForCausalLM.from_pretrained(llama_dir)
        config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False)
        dirs[name] = llama_dir.parent / "adapters" / name
        get_peft_model(base, config).save_pretrained(dirs[name])
    return dirs


def peft_greedy(llama_dir, loras, ids, n) -> dict[str, list[int]]:
    """Greedy tokens of the base and of each adapter, through PeftModel with that adapter set."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_dir), loras["a1"], adapter_name="a1")
    model.load_adapter(loras["a2"], adapter_name="a2")
    model.eval()
    out = {}
    for name in ("a1", "a2"):
        model.set_adapter(name)
        out[name] = hf_greedy(model, ids, n)
    with model.disable_adapter():
        out["llama"] = hf_greedy(model, ids, n)
    return out


def test_two_loras_and_the_base_served_at_once_match_peft(llama_dir, loras, tokenizer):
    async def main():
        adapters = {name: str(path) for name, path in loras.items()}
        async with serving(llama_dir, adapters=adapters) as engine:
            names = engine.model_names()
            results = await asyncio.gather(*(collect(engine, ask(engine, PROMPTS[k], model=name, max_tokens=16))
                                             for k in (1, 2) for name in names))
            return names, [tokens(r) for r in results]

    names, got = run(main())
    assert names == ["llama", "a1", "a2"]
    for k, prompt in enumerate((PROMPTS[1], PROMPTS[2])):
        expected = peft_greedy(llama_dir, loras, ids_of(tokenizer, prompt), 16)
        assert len({tuple(v) for v in expected.values()}) == 3  # the adapters change the output
        assert got[3 * k:3 * k + 3] == [expected[name] for name in names]


def test_runtime_adapters_stay_inside_the_model_root(llama_dir, loras, tmp_path):
    from peft import PromptTuningConfig, get_peft_model

    outside = tmp_path / "outside"
    shutil.copytree(loras["a1"], outside)
    root = llama_dir.parent
    link = root / "adapters" / "leads_out"
    if not link.exists():
        os.symlink(outside, link)
    prompt_tuned = root / "adapters" / "prompt_tuned"
    get_peft_model(LlamaForCausalLM.from_pretrained(llama_dir),
                   PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(prompt_tuned)

    async def main():
        async with serving(llama_dir, model_root=str(root)) as engine:
            for path in (str(outside), "../../outside", str(link), "adapters/leads_out", "adapters/missing"):
                with pytest.raises(ModelNotFound):
                    await engine.load_adapter("x", path)
            with pytest.raises(EngineError, match="LORA, IA3, BOTTLENECK") as refused:
                await engine.load_adapter("pt", "adapters/prompt_tuned")
            running = asyncio.create_task(collect(engine, ask(engine, PROMPTS[1], max_tokens=40)))
            await asyncio.sleep(0.02)
            await engine.load_adapter("a3", "adapters/a2")  # between decode steps of the running job
            names = engine.model_names()
            served = await collect(engine, ask(engine, PROMPTS[1], model="a3", max_tokens=8))
            await engine.unload_adapter("a3")
            with pytest.raises(ModelNotFound):
                await engine.generate(ask(engine, PROMPTS[1], model="a3")).__anext__()
            return names, tokens(served), await running, str(refused.value)

    names, served, running, refused = run(main())
    assert names == ["llama", "a3"] and len(served) == 8
    assert running[-1].finish_reason in ("length", "stop") and "optimize" in refused


def test_a_bottleneck_adapter_is_served_like_its_model(llama_dir, tokenizer, tmp_path):
    from lifecycle.training.bottleneck import BottleneckConfig, add_bottleneck, save_bottleneck

    torch.manual_seed(3)
    config = BottleneckConfig(bottleneck_size=8, non_linearity="silu", dropout=0.0,
                              target_modules=["o_proj", "down_proj"], scaling=1.0)
    adapted = add_bottleneck(LlamaForCausalLM.from_pretrained(llama_dir), config, "neck")
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "adapter_up" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter (it starts as the identity)
    save_bottleneck(adapted, tmp_path / "neck", "neck")
    ids = ids_of(tokenizer, PROMPTS[2])

    async def main():
        async with serving(llama_dir, adapters={"neck": str(tmp_path / "neck")}) as engine:
            return await asyncio.gather(*(collect(engine, ask(engine, ids, model=m, max_tokens=12))
                                          for m in ("neck", "llama")))

    neck, base = run(main())
    expected = hf_greedy(adapted.model.eval(), ids, 12)
    assert tokens(neck) == expected != tokens(base)


def test_an_adapter_brings_its_own_chat_template(llama_dir, loras, tokenizer, tmp_path):
    """`lifecycle finetune` saves the chat template beside the adapter; chats to it use it, the base has none."""
    chatty = tmp_path / "chatty"
    shutil.copytree(loras["a1"], chatty)
    (chatty / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    messages = [{"role": "user", "content": "def add(a, b):"}]

    async def main():
        async with serving(llama_dir, adapters={"chatty": str(chatty)}) as engine:
            with pytest.raises(NoChatTemplate, match="llama has no chat template"):
                engine.render_chat(messages, "llama")
            return engine.render_chat(messages, "chatty")

    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    finally:
        tokenizer.chat_template = None
    assert run(main()) == list(expected)
