"""Deploy profiles that need no real model: the hybrid router (on fake engines) and the vLLM command line."""
import asyncio
import json

import pytest

from lifecycle.errors import ConfigError
from lifecycle.serve.hybrid import HybridEngine
from lifecycle.serve.protocol import GenerationRequest, ModelNotFound, Sampling
from lifecycle.serve.testing import FakeEngine
from lifecycle.serve import vllm


def _run(engine, prompt, model, **sampling):
    async def go():
        await engine.start()
        return [e async for e in engine.generate(GenerationRequest(engine.encode(prompt), Sampling(**sampling), model))]
    return asyncio.run(go())


def _pair(**rule):
    return HybridEngine(FakeEngine(name="small", text="s"), FakeEngine(name="large", text="L"), **rule)


def test_long_prompts_go_to_the_large_model():
    engine = _pair(escalate_prompt_tokens=10)
    short = "".join(e.text for e in _run(engine, "hi", "small", max_tokens=3, temperature=0))
    long = "".join(e.text for e in _run(engine, "x" * 11, "small", max_tokens=3, temperature=0))
    assert (short, long) == ("sss", "LLL")
    assert engine.routed["small"] == 1 and engine.routed["large"] == 1


def test_low_confidence_answers_escalate_and_confident_ones_stay():
    # The fake engine gives every token log-prob -1.0.
    doubtful = _pair(escalate_mean_logprob=-0.5)
    assert "".join(e.text for e in _run(doubtful, "hi", "small", max_tokens=2, temperature=0)) == "LL"
    assert doubtful.routed["escalated_after_small"] == 1
    confident = _pair(escalate_mean_logprob=-2.0)
    events = _run(confident, "hi", "small", max_tokens=2, temperature=0)
    assert "".join(e.text for e in events) == "ss" and all(not e.logprobs for e in events)  # not asked for


def test_hybrid_refuses_unknown_models_and_needs_a_rule():
    with pytest.raises(ModelNotFound):
        _run(_pair(escalate_prompt_tokens=4), "hi", "nope", max_tokens=1)
    with pytest.raises(ConfigError, match="escalation rule"):
        HybridEngine(FakeEngine(), FakeEngine())


def _adapter(path, peft_type="LORA", r=4):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": r}))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return str(path)


def test_vllm_command_serves_the_model_with_its_lora_adapters(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cmd = vllm.command(str(model), {"tuned": _adapter(tmp_path / "a", r=12)}, "0.0.0.0", 8000, 512, "bfloat16",
                       2, ["--gpu-memory-utilization", "0.8"], "base")
    assert cmd[:3] == ["vllm", "serve", str(model.resolve())]
    assert cmd[cmd.index("--max-lora-rank") + 1] == "16"  # rounded up to a rank vLLM accepts
    assert f"tuned={(tmp_path / 'a').resolve()}" in cmd and "--enable-lora" in cmd
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2" and cmd[-2:] == ["--gpu-memory-utilization", "0.8"]


def test_vllm_refuses_what_it_cannot_serve(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        vllm.command(str(tmp_path), {}, "h", 1, None, "auto", 1, [], None)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="LoRA adapters only"):
        vllm.command(str(tmp_path), {"p": _adapter(tmp_path / "p", "P_TUNING")}, "h", 1, None, "auto", 1, [], None)
    with pytest.raises(ConfigError, match="pip install vllm"):
        vllm.launch(["surely-not-installed-vllm-binary", "serve"])
