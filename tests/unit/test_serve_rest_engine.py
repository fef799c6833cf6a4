"""The REST front end over the real LocalEngine on a tiny random Llama: what lm-eval scores with equals the model's
own log-probs, streams equal whole answers, a departed stream frees its slot, a missing chat template is a 400."""
from __future__ import annotations

import json

import pytest
import torch
from serve_models import llama_dir, tokenizer  # noqa: F401  (fixtures)
from serve_rest_live import Live, until
from test_serve_engine import slow_steps
from transformers import AutoTokenizer, LlamaForCausalLM

from lifecycle.serve.engine import LocalEngine

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def live(llama_dir):  # noqa: F811
    with Live(LocalEngine(str(llama_dir), max_batch_size=4, max_queue=4), drain_timeout_s=2) as server:
        yield server


def test_echoed_logprobs_are_the_models_own(live, llama_dir):  # noqa: F811
    ids = live.engine.encode("def add(a, b):\n    return")
    with live.client() as c:
        body = {"model": live.engine.name, "prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True,
                "temperature": 0, "seed": 1234}
        lp = c.post(CMPL, json=body).json()["choices"][0]["logprobs"]
    model = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]  # [len(ids), vocab]
    expected = torch.log_softmax(logits[:-1].float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    got = lp["token_logprobs"][1:len(ids)]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids) + 1
    assert got == pytest.approx(expected.tolist(), abs=1e-4)
    assert all(lp["tokens"][i] in lp["top_logprobs"][i] for i in range(1, len(ids) + 1))


def test_stream_equals_the_whole_answer_and_departure_frees_the_slot(live, monkeypatch):
    body = {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}
    before = live.counters(CMPL)
    with live.client() as c:
        whole = c.post(CMPL, json=body).json()["choices"][0]["text"]
        with c.stream("POST", CMPL, json={**body, "stream": True}) as r:
            lines = [ln.removeprefix("data: ") for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "[DONE]" and "".join(json.loads(x)["choices"][0]["text"] for x in lines[:-1]) == whole
        # Steps held to >= 5 ms for the departing stream: the C decode step runs this tiny model's 100 tokens in
        # ~25 ms, which could end the generation before the server has seen the client leave.
        slow_steps(monkeypatch, 0.005)
        with c.stream("POST", CMPL, json={**body, "max_tokens": 100, "stream": True}) as r:
            next(r.iter_lines())
        assert until(lambda: live.engine.stats() == {"running": 0, "queued": 0} and live.in_flight() == 0, 1.0)
        after = live.counters(CMPL)
        assert (after["ok"] - before.get("ok", 0), after["cancelled"] - before.get("cancelled", 0)) == (2, 1)


def test_chat_without_a_template_is_400(live, llama_dir):  # noqa: F811
    with live.client() as c:
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    if AutoTokenizer.from_pretrained(llama_dir).chat_template is None:
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
    else:
        assert r.status_code == 200
