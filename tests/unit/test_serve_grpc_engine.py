"""The gRPC front end over the real LocalEngine on a tiny random Llama: what the fake engine cannot show."""
from __future__ import annotations

import asyncio

import pytest

from lifecycle.serve.grpc_stubs import pb2

from test_serve_grpc import AUTH, Code, Env, refused, serve  # noqa: F401  (serve is the fixture)

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lifecycle.data.tokenizer import train_bpe

    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog."] * 20
    tokenizer = train_bpe(texts, vocab_size=300, min_frequency=1, model_max_length=64)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0)
    directory = tmp_path_factory.mktemp("model") / "tiny"
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_real_engine_unary_stream_parity_refusals_and_cancel(serve, llama_dir, monkeypatch):
    from test_serve_engine import slow_steps

    from lifecycle.serve.engine import LocalEngine

    torch.set_num_threads(1)
    # Steps of >= 5 ms: the C decode step runs this model's 50 tokens in ~10 ms, and the cancelled stream must still
    # be running when the server sees the cancellation.
    slow_steps(monkeypatch, 0.005)

    async def test(env: Env):
        greedy = pb2.GenerateRequest(prompt="def add", max_tokens=12, temperature=0)
        whole = await env.stub.Generate(greedy, metadata=AUTH)
        assert whole.model == "tiny" and whole.usage.completion_tokens == len(whole.token_ids) > 0
        chunks = [c async for c in env.stub.GenerateStream(greedy, metadata=AUTH)]
        assert "".join(c.text for c in chunks) == whole.text
        assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
        assert chunks[-1].finish_reason == whole.finish_reason in ("stop", "length")
        error = await refused(env.stub.Generate(pb2.GenerateRequest(prompt_ids=[5, 99999]), metadata=AUTH))
        assert error.code() == Code.INVALID_ARGUMENT and "99999" in error.details()
        error = await refused(env.stub.Generate(pb2.GenerateRequest(prompt="x", max_tokens=64), metadata=AUTH))
        assert error.code() == Code.INVALID_ARGUMENT and "64" in error.details()
        stream = env.stub.GenerateStream(pb2.GenerateRequest(prompt="def", max_tokens=50, temperature=0,
                                                             stop=["\x00never"]), metadata=AUTH)
        await stream.read()
        stream.cancel()
        assert await env.idle(within=1.0) < 1.0
        assert (await env.stub.Generate(greedy, metadata=AUTH)).text == whole.text
        assert env.outcomes()["cancelled"] == 1 and env.outcomes()["client_error"] == 2
    serve(test, kind=lambda: LocalEngine(str(llama_dir), max_batch_size=2, max_queue=2))
