"""Tiny random Llama and GPT-2 model directories and helpers shared by the LocalEngine tests."""
from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lifecycle.data.tokenizer import train_bpe
from lifecycle.serve.engine import LocalEngine
from lifecycle.serve.protocol import GenerationRequest, Sampling

torch.set_num_threads(1)
TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
         "import os\nprint(os.getcwd())\n", "for i in range(10):\n    total += i * i\n"] * 20
PROMPTS = ["def add", "The quick brown fox jumps over", "import os\nprint(os.", "x", "for i in range(10):\n   "]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TEXTS, vocab_size=320, min_frequency=1, model_max_length=128)


def _save(model, tokenizer, directory):
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0)
    return _save(LlamaForCausalLM(config), tokenizer, tmp_path_factory.mktemp("root") / "llama")


@pytest.fixture(scope="module")
def gpt2_dir(tokenizer, tmp_path_factory):
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    return _save(GPT2LMHeadModel(config), tokenizer, tmp_path_factory.mktemp("root") / "gpt2")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@asynccontextmanager
async def serving(directory, **settings):
    engine = LocalEngine(str(directory), **{"max_batch_size": 4, "max_queue": 4, **settings})
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


def ask(engine, prompt, model=None, **sampling) -> GenerationRequest:
    ids = engine.encode(prompt) if isinstance(prompt, str) else prompt
    return GenerationRequest(ids, Sampling(**{"temperature": 0, **sampling}), model or engine.name)


async def collect(engine, req, after=None):
    """All events of one generation; `after`: an asyncio.Event to wait for before asking."""
    if after is not None:
        await after.wait()
    return [event async for event in engine.generate(req)]


def tokens(events) -> list[int]:
    return [t for e in events for t in e.token_ids]


def hf_greedy(model, ids, n) -> list[int]:
    inputs = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


async def wait_idle(engine, seconds=2.0):
    end = time.monotonic() + seconds
    while engine.stats() != {"running": 0, "queued": 0} and time.monotonic() < end:
        await asyncio.sleep(0.01)
    return engine.stats()


def ids_of(tokenizer, prompt) -> list[int]:
    return tokenizer.encode(prompt, add_special_tokens=False)
