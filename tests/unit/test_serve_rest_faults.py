"""The REST front end under faults (TESTPLAN serving cases 12-17) and with real clients: streams, disconnects,
engine errors, overload, deadlines, SIGTERM, the official `openai` client, lm-eval's log-prob shape and usage."""
from __future__ import annotations

import concurrent.futures
import json
import math
import signal
import time
from types import SimpleNamespace

import httpx
import openai
import psutil
import pytest
from serve_rest_live import KEY, Live, events, idle, start_server_process, until

from lifecycle.serve.testing import FakeEngine
from lifecycle.serve.usage import UsageMeter

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def test_disconnect_mid_stream_cancels_within_a_second_and_stays_flat():
    engine = FakeEngine(token_delay=0.02)
    with Live(engine) as live, live.client() as c:
        def cut_once():
            with c.stream("POST", CMPL, json={"prompt": "x", "max_tokens": 100, "stream": True}) as r:
                next(r.iter_lines())
            gone = time.monotonic()  # leaving the block closes the connection
            assert until(lambda: idle(engine) and live.in_flight() == 0, 1.0)
            return time.monotonic() - gone
        for _ in range(5):  # warm up allocators and the connection pool
            cut_once()
        proc = psutil.Process()
        fds, rss = proc.num_fds(), proc.memory_info().rss
        worst = max(cut_once() for _ in range(50))
        assert worst < 1.0
        assert proc.num_fds() <= fds + 2 and proc.memory_info().rss < rss * 1.05
        assert engine.cancelled == 55 and live.counters(CMPL)["cancelled"] == 55
        assert c.post(CMPL, json={"prompt": "x"}).status_code == 200


def test_disconnect_before_the_first_token_is_cancelled_and_counted():
    engine = FakeEngine(token_delay=2.0)
    with Live(engine) as live, live.client(timeout=0.3) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post(CMPL, json={"prompt": "x", "max_tokens": 3})
        # The outcome is counted before the handler returns and the in-flight gauge drops: wait for both.
        assert until(lambda: live.counters(CMPL).get("cancelled") == 1 and live.in_flight() == 0, 1.5)
        assert engine.cancelled == 1 and idle(engine)


def test_engine_error_mid_stream_is_an_error_event_then_done():
    with Live(FakeEngine(fail_after=3)) as live, live.client() as c:
        for route, body in ((CMPL, {"prompt": "x"}), (CHAT, {"messages": HI})):
            with c.stream("POST", route, json={**body, "max_tokens": 10, "stream": True}) as r:
                assert r.status_code == 200
                got = events(r.iter_lines())
            assert got[-1] == "[DONE]" and got.count("[DONE]") == 1
            assert got[-2]["error"]["code"] == "engine_error" and "injected" in got[-2]["error"]["message"]
            assert all("error" not in e for e in got[:-2])
        r = c.post(CMPL, json={"prompt": "x", "max_tokens": 10})
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        assert live.counters(CMPL)["error"] == 2 and live.counters(CHAT)["error"] == 1


def test_overload_is_an_immediate_429_with_retry_after_and_accepted_requests_finish():
    engine = FakeEngine(token_delay=0.05, max_batch_size=2, max_queue=2)
    with Live(engine) as live, live.client() as c:
        def one(_):
            start = time.monotonic()
            r = c.post(CMPL, json={"prompt": "x", "max_tokens": 10})
            return r, time.monotonic() - start
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            results = list(pool.map(one, range(10)))
        ok = [r for r, _ in results if r.status_code == 200]
        rejected = [(r, s) for r, s in results if r.status_code == 429]
        assert len(ok) + len(rejected) == 10 and len(ok) >= 4 and rejected
        assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
                   for r, _ in rejected)
        assert max(s for _, s in rejected) < 0.4  # a 10-token job takes 0.5 s: rejections do not wait for it
        assert all(r.json()["choices"][0]["text"] == "hello worl" for r in ok)
        assert live.counters(CMPL) == {"ok": len(ok), "rejected": len(rejected)}


def test_deadline_is_504_or_a_timeout_chunk_and_the_job_is_aborted():
    engine = FakeEngine(token_delay=0.05)
    with Live(engine, request_timeout_s=0.3) as live, live.client() as c:
        start = time.monotonic()
        r = c.post(CMPL, json={"prompt": "x", "max_tokens": 100})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert time.monotonic() - start < 1.0 and until(lambda: idle(engine), 0.5)
        with c.stream("POST", CHAT, json={"messages": HI, "max_tokens": 100, "stream": True,
                                          "stream_options": {"include_usage": True}}) as s:
            got = events(s.iter_lines())
        assert got[-1] == "[DONE]" and got.count("[DONE]") == 1
        assert got[-3]["choices"][0]["finish_reason"] == "timeout" and got[-2]["usage"]["completion_tokens"] > 0
        assert until(lambda: idle(engine), 0.5)
        assert live.counters() == {"timeout": 2}


def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path):
    proc, url, out = start_server_process(tmp_path, token_delay=0.05)
    headers = {"authorization": f"Bearer {KEY}"}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        flying = [pool.submit(httpx.post, f"{url}{CMPL}", json={"prompt": "x", "max_tokens": 20},
                              headers=headers, timeout=10) for _ in range(3)]
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()
        assert httpx.get(f"{url}/ready").status_code == 503 and time.monotonic() - sent_at < 0.5
        late = httpx.post(f"{url}{CMPL}", json={"prompt": "x"}, headers=headers)
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
        done = [f.result() for f in flying]
    assert [r.status_code for r in done] == [200] * 3 and all(len(r.json()["choices"][0]["text"]) == 20
                                                               for r in done)
    assert proc.wait(timeout=10) == 0, proc.stdout.read()
    counters = json.loads(out.read_text())
    assert counters[CMPL] == {"ok": 3, "unavailable": 1}
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE


def test_openai_client_completions_chat_and_streaming_usage():
    with Live() as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)
        c = client.completions.create(model="fake", prompt="abc", max_tokens=5, temperature=0)
        assert c.choices[0].text == "hello" and (c.usage.prompt_tokens, c.usage.completion_tokens) == (3, 5)
        chat = client.chat.completions.create(model="fake", messages=HI, max_tokens=4)
        assert chat.choices[0].message.content == "hell" and chat.usage.completion_tokens == 4
        assert chat.usage.prompt_tokens == len("<user>hi\n<assistant>")
        stream = client.chat.completions.create(model="fake", messages=HI, max_tokens=6, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "hello "
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == chat.usage.prompt_tokens + 6
        text = "".join(ch.choices[0].text for ch in client.completions.create(
            model="fake", prompt="x", max_tokens=10, stream=True, stop=["wor"]))
        assert text == "hello "
        lp = client.chat.completions.create(model="fake", messages=HI, max_tokens=2, logprobs=True, top_logprobs=1)
        content = lp.choices[0].logprobs.content
        assert [t.token for t in content] == ["h", "e"] and content[0].top_logprobs[0].logprob == -1.0
        assert [m.id for m in client.models.list()] == ["fake"]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="x")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{live.url}/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_lm_eval_local_completions_round_trip():
    """lm-eval's own payload builder and parsers (LocalCompletionsAPI) against the server."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI as LM
    lm = SimpleNamespace(model="fake", _max_gen_toks=8)
    with Live() as live, live.client() as c:
        ctx, cont = [ord(ch) for ch in "The cat"], [ord(ch) for ch in " sat"]
        scoring = LM._create_payload(lm, [ctx + cont, ctx], generate=False)
        out = c.post(CMPL, json=scoring).json()
        assert [ch["index"] for ch in out["choices"]] == [0, 1]
        (score, greedy), _ = LM.parse_logprobs(out, ctxlens=[len(ctx), len(ctx) - 2])
        assert score == pytest.approx(-math.log(2) * len(cont)) and greedy
        lp = out["choices"][0]["logprobs"]
        assert len(lp["token_logprobs"]) == len(ctx + cont) + 1 and lp["token_logprobs"][0] is None
        assert out["choices"][0]["text"] == "The cat sat" + "h" and lp["text_offset"][:3] == [0, 1, 2]
        gen = LM._create_payload(lm, ["Q: a", "Q: b"], generate=True, gen_kwargs={"until": ["wor", "\n\n"],
                                                                                  "max_gen_toks": 10})
        assert LM.parse_generations(c.post(CMPL, json=gen).json()) == ["hello ", "hello "]
        assert c.get("/tokenizer_info").status_code == 404  # lm-eval falls back to its local tokenizer


def usage_rows(meter: UsageMeter) -> list[dict]:
    meter.flush()
    with meter.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.exec_driver_sql("select * from requests order by id")]


def test_usage_meter_gets_one_row_per_request(tmp_path):
    meter = UsageMeter(f"sqlite:///{tmp_path / 'usage.db'}")
    with Live(meter=meter) as live, live.client() as c:
        c.post(CMPL, json={"prompt": "abc", "max_tokens": 4, "logprobs": 0})
        c.post(CHAT, json={"messages": HI, "max_tokens": 2, "stream": True})
        c.post(CMPL, json={"prompt": "x", "model": "nope"})
        c.get("/v1/models")
    rows = usage_rows(meter)
    assert [(r["route"], r["status"], r["key_id"]) for r in rows] == [
        (CMPL, 200, "tester"), (CHAT, 200, "tester"), (CMPL, 404, "tester"), ("/v1/models", 200, "tester")]
    first = rows[0]
    assert (first["prompt_tokens"], first["completion_tokens"], first["finish_reason"]) == (3, 4, "length")
    assert first["mean_logprob"] == -1.0 and first["ttft_ms"] > 0 and json.loads(first["text"]) is None
    assert json.loads(first["stats"])["output_chars"] == 4
    meter.close()


def test_usage_log_keeps_text_only_when_allowed(tmp_path):
    meter = UsageMeter(f"sqlite:///{tmp_path / 'usage.db'}", log_text=True)
    with Live(meter=meter, log_text=True) as live, live.client() as c:
        c.post(CMPL, json={"prompt": "abc", "max_tokens": 2})
    assert json.loads(usage_rows(meter)[0]["text"]) == {"prompt": "abc", "output": "he"}
    meter.close()


def test_n_choices_and_prompt_batches_stream_with_indices():
    with Live() as live, live.client() as c:
        with c.stream("POST", CMPL, json={"prompt": ["ab", "cd"], "n": 2, "max_tokens": 3, "seed": 7,
                                          "stream": True}) as r:
            got = events(r.iter_lines())
        texts: dict[int, str] = {}
        for e in got[:-1]:
            ch = e["choices"][0]
            texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
        assert sorted(texts) == [0, 1, 2, 3] and all(len(t) == 3 for t in texts.values())
        assert texts[0] != texts[1]  # seed + j: choices differ, and the same request repeats them


def test_streamed_echo_leads_with_the_prompt_and_offsets_continue():
    with Live() as live, live.client() as c:
        with c.stream("POST", CMPL, json={"prompt": "ab", "max_tokens": 3, "echo": True, "logprobs": 0,
                                          "stream": True}) as r:
            chunks = [e["choices"][0] for e in events(r.iter_lines())[:-1]]
        assert "".join(ch["text"] for ch in chunks) == "abhel"
        tokens = [t for ch in chunks for t in ch["logprobs"]["tokens"]]
        offsets = [o for ch in chunks for o in ch["logprobs"]["text_offset"]]
        assert tokens == list("abhel") and offsets == [0, 1, 2, 3, 4]
        assert chunks[0]["logprobs"]["token_logprobs"][0] is None and chunks[-1]["finish_reason"] == "length"


class GarbageEngine(FakeEngine):
    """Emits an event the front end cannot format (a bug stand-in) after two good ones."""

    async def generate(self, request):
        n = 0
        async for event in super().generate(request):
            n += 1
            if n == 3:
                event.logprobs = [object()]  # not a TokenLogprob
            yield event


def test_a_bug_mid_stream_is_reported_not_a_silent_truncation(caplog):
    with Live(GarbageEngine()) as live, live.client() as c:
        with c.stream("POST", CMPL, json={"prompt": "x", "max_tokens": 8, "logprobs": 0, "stream": True}) as r:
            got = events(r.iter_lines())
        assert got[-1] == "[DONE]" and got[-2]["error"]["code"] == "internal_error" and len(got) == 4
        assert live.counters(CMPL) == {"error": 1} and "stream failed" in caplog.text
        assert until(lambda: idle(live.engine), 1)
