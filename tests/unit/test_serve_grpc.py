"""The gRPC front end against the fake engine: a real server on 127.0.0.1, clients from the generated stubs."""
from __future__ import annotations

import asyncio
import socket
import statistics
import time
from contextlib import aclosing
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lifecycle.errors import ConfigError
from lifecycle.serve.auth import KeyStore, digest
from lifecycle.serve.grpc_server import GENERATION, GrpcSettings, build_server
from lifecycle.serve.grpc_stubs import pb2, pb2_grpc
from lifecycle.serve.metrics import OUTCOMES, ServeMetrics
from lifecycle.serve.protocol import EngineError, Event
from lifecycle.serve.testing import FakeEngine
from lifecycle.serve.usage import UsageMeter

KEY = "sk-test-not-a-real-key"
AUTH = (("authorization", f"Bearer {KEY}"),)
Code = grpc.StatusCode


@dataclass
class Env:
    engine: FakeEngine
    stub: pb2_grpc.GenerationStub
    channel: grpc.aio.Channel
    metrics: ServeMetrics
    meter: UsageMeter
    server: grpc.aio.Server

    def outcomes(self) -> dict[str, float]:
        """lifecycle_requests{frontend="grpc"} summed per outcome."""
        totals = dict.fromkeys(OUTCOMES, 0.0)
        for sample in self.metrics.requests.collect()[0].samples:
            if sample.name.endswith("_total") and sample.labels["frontend"] == "grpc":
                totals[sample.labels["outcome"]] += sample.value
        return totals

    async def idle(self, within: float = 1.0) -> float:
        """Seconds until the engine has nothing running or queued (fails after `within`)."""
        start = time.monotonic()
        while self.engine.stats() != {"running": 0, "queued": 0}:
            assert time.monotonic() - start < within, f"engine still busy: {self.engine.stats()}"
            await asyncio.sleep(0.005)
        return time.monotonic() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve(tmp_path):
    """serve(test, start=True, settings={...}, kind=FakeEngine, **engine kwargs): `await test(env)` against a
    live server."""
    def run(test, start: bool = True, settings: dict | None = None, kind=FakeEngine, **engine_kwargs):
        async def main():
            engine = kind(**engine_kwargs)
            if start:
                await engine.start()
            metrics = ServeMetrics(engine.stats, lambda: engine.ready)
            meter = UsageMeter(f"sqlite:///{tmp_path / 'usage.db'}")
            port = free_port()
            server = build_server(engine, KeyStore({digest(KEY): "alice"}), meter, metrics,
                                  GrpcSettings(port=port, **(settings or {})))
            await server.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    await test(Env(engine, pb2_grpc.GenerationStub(channel), channel, metrics, meter, server))
            finally:
                await server.stop(None)
                meter.close()
        asyncio.run(asyncio.wait_for(main(), 30))
    return run


async def finish(call):
    """The response of a unary call, or every message of a stream."""
    return [c async for c in call] if hasattr(call, "__aiter__") else await call


async def refused(call) -> grpc.aio.AioRpcError:
    """The error a unary call or a whole stream ends with."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        pytest.fail(f"expected an error, got {await finish(call)}")
    return info.value


def test_unary_and_stream_give_the_engines_text(serve):
    async def test(env: Env):
        for req in (pb2.GenerateRequest(prompt="hi", max_tokens=17),
                    pb2.GenerateRequest(prompt_ids=[104, 105], max_tokens=17, temperature=0)):
            r = await env.stub.Generate(req, metadata=AUTH)
            assert (r.text, r.finish_reason, r.model) == ("hello world hello", "length", "fake")
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (2, 17)
            assert r.token_ids == [ord(c) for c in r.text]
            chunks = [c async for c in env.stub.GenerateStream(req, metadata=AUTH)]
            assert "".join(c.text for c in chunks) == r.text
            assert [c.finish_reason for c in chunks] == [""] * 16 + ["length"]
            assert chunks[-1].usage.completion_tokens == 17
        stop = pb2.GenerateRequest(prompt="x", max_tokens=30, stop=["wor"], seed=7, temperature=0)
        r = await env.stub.Generate(stop, metadata=AUTH)
        assert (r.text, r.finish_reason) == ("hello ", "stop")
        assert "".join([c.text async for c in env.stub.GenerateStream(stop, metadata=AUTH)]) == "hello "
        seeded = pb2.GenerateRequest(prompt="x", max_tokens=12, seed=3, logprobs=1)
        r = await env.stub.Generate(seeded, metadata=AUTH)
        assert "".join([c.text async for c in env.stub.GenerateStream(seeded, metadata=AUTH)]) == r.text
        assert [lp.token for lp in r.logprobs] == list(r.text) and r.logprobs[0].logprob == -1.0
        models = await env.stub.ListModels(pb2.ListModelsRequest(), metadata=AUTH)
        assert [(m.name, m.context_length) for m in models.models] == [("fake", 256), ("ada", 256)]
        assert env.outcomes()["ok"] == 9
        env.meter.flush()
        rows = env.meter.statement(0, time.time() + 1)
        assert {(r["model"], r["requests"], r["errors"]) for r in rows} == {("fake", 8, 0), ("-", 1, 0)}
    serve(test, adapters=("ada",))


def test_health_follows_engine_readiness_without_a_key(serve):
    async def test(env: Env):
        health = health_pb2_grpc.HealthStub(env.channel)
        states = health_pb2.HealthCheckResponse

        async def check(service=""):
            return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status
        assert await check() == states.NOT_SERVING and await check(GENERATION) == states.NOT_SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=GENERATION))
        assert (await watch.read()).status == states.NOT_SERVING
        assert (await refused(env.stub.Generate(pb2.GenerateRequest(prompt="x"), metadata=AUTH))).code() == \
            Code.UNAVAILABLE
        await env.engine.start()
        assert (await asyncio.wait_for(watch.read(), 2)).status == states.SERVING
        assert await check() == states.SERVING
        await env.engine.stop()  # draining
        assert (await asyncio.wait_for(watch.read(), 2)).status == states.NOT_SERVING
        await env.engine.start()
        assert (await asyncio.wait_for(watch.read(), 2)).status == states.SERVING
        stopping = asyncio.ensure_future(env.server.stop(2.0))  # shutdown: NOT_SERVING before the port closes
        assert (await asyncio.wait_for(watch.read(), 2)).status == states.NOT_SERVING
        watch.cancel()
        await stopping
        assert env.outcomes()["unavailable"] == 1
    serve(test, start=False)


def test_reflection_lists_the_services_to_key_holders(serve):
    async def test(env: Env):
        stub = reflection_pb2_grpc.ServerReflectionStub(env.channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        answers = [a async for a in stub.ServerReflectionInfo(iter([ask]), metadata=AUTH)]
        names = {s.name for s in answers[0].list_services_response.service}
        assert {GENERATION, "grpc.health.v1.Health"} <= names
        assert (await refused(stub.ServerReflectionInfo(iter([ask])))).code() == Code.UNAUTHENTICATED
    serve(test)


BAD_AUTH = {"missing": (), "wrong": (("authorization", "Bearer sk-other"),),
            "case": (("authorization", f"Bearer {KEY.upper()}"),), "scheme": (("authorization", f"Basic {KEY}"),),
            "bare": (("authorization", KEY),), "prefix": (("authorization", f"Bearer {KEY[:-1]}"),)}


def test_every_generation_method_needs_the_exact_key(serve):
    async def test(env: Env):
        req = pb2.GenerateRequest(prompt="x", max_tokens=2)
        calls = {"Generate": lambda md: env.stub.Generate(req, metadata=md),
                 "GenerateStream": lambda md: env.stub.GenerateStream(req, metadata=md),
                 "ListModels": lambda md: env.stub.ListModels(pb2.ListModelsRequest(), metadata=md)}
        # Every method the service declares is here, so one added later without a case fails this test.
        assert set(calls) == set(pb2.DESCRIPTOR.services_by_name["Generation"].methods_by_name)
        for name, call in calls.items():
            for case, md in BAD_AUTH.items():
                error = await refused(call(md))
                assert error.code() == Code.UNAUTHENTICATED, (name, case)
            await finish(call(AUTH))
        assert env.engine.cancelled == 0 and env.outcomes()["client_error"] == 3 * len(BAD_AUTH)
    serve(test)


INVALID = {  # request fields -> the field the error must name
    "max_tokens=0": ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    "max_tokens<0": ({"prompt": "x", "max_tokens": -3}, "max_tokens"),
    "max_tokens>cap": ({"prompt": "x", "max_tokens": 65}, "max_tokens"),
    "temperature<0": ({"prompt": "x", "temperature": -0.1}, "temperature"),
    "temperature nan": ({"prompt": "x", "temperature": float("nan")}, "temperature"),
    "top_p=0": ({"prompt": "x", "top_p": 0.0}, "top_p"),
    "top_p>1": ({"prompt": "x", "top_p": 1.5}, "top_p"),
    "top_k<0": ({"prompt": "x", "top_k": -1}, "top_k"),
    "empty prompt": ({"prompt": ""}, "prompt"),
    "both prompts": ({"prompt": "x", "prompt_ids": [1]}, "prompt"),
    "negative ids": ({"prompt_ids": [5, -1]}, "prompt_ids"),
    "too many stops": ({"prompt": "x", "stop": ["a", "b", "c"]}, "stop"),
    "logprobs>cap": ({"prompt": "x", "logprobs": 6}, "logprobs"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_bad_fields_are_invalid_argument_naming_the_field(serve, stream):
    async def test(env: Env):
        rpc = env.stub.GenerateStream if stream else env.stub.Generate
        for case, (fields, field) in INVALID.items():
            error = await refused(rpc(pb2.GenerateRequest(**fields), metadata=AUTH))
            assert error.code() == Code.INVALID_ARGUMENT, case
            assert error.details().startswith(f"{field}: "), (case, error.details())
        error = await refused(rpc(pb2.GenerateRequest(prompt="x" * 50, max_tokens=60), metadata=AUTH))
        assert error.code() == Code.INVALID_ARGUMENT and "50" in error.details() and "60" in error.details()
        error = await refused(rpc(pb2.GenerateRequest(prompt="x", model="../etc/passwd"), metadata=AUTH))
        assert error.code() == Code.NOT_FOUND and "passwd" in error.details()
        assert env.outcomes()["client_error"] == len(INVALID) + 2 and env.engine.stats()["running"] == 0
        assert all(s.labels["model"] in ("fake", "unknown") for s in env.metrics.requests.collect()[0].samples)
    serve(test, context_length=100, settings={"max_tokens_cap": 64, "default_max_tokens": 8, "max_stop": 2,
                                              "max_logprobs": 5})


def test_overload_and_oversized_messages_are_resource_exhausted(serve):
    async def test(env: Env):
        first = env.stub.GenerateStream(pb2.GenerateRequest(prompt="x", max_tokens=10), metadata=AUTH)
        assert (await first.read()).text == "h"  # holds the only slot
        error = await refused(env.stub.Generate(pb2.GenerateRequest(prompt="x"), metadata=AUTH))
        assert error.code() == Code.RESOURCE_EXHAUSTED
        assert dict(error.trailing_metadata())["retry-after"] == "1"
        rest = [await first.read() for _ in range(9)]  # the accepted request still finishes
        assert "".join(c.text for c in rest) == "ello worl" and await first.read() == grpc.aio.EOF
        error = await refused(env.stub.Generate(pb2.GenerateRequest(prompt="x" * 5000), metadata=AUTH))
        assert error.code() == Code.RESOURCE_EXHAUSTED and env.engine.cancelled == 0
        assert (env.outcomes()["ok"], env.outcomes()["rejected"]) == (1, 1)
    serve(test, max_batch_size=1, max_queue=0, token_delay=0.01, settings={"max_message_bytes": 4096})


def test_deadlines_abort_the_job(serve):
    async def test(env: Env):
        req = pb2.GenerateRequest(prompt="x", max_tokens=200)
        error = await refused(env.stub.Generate(req, metadata=AUTH, timeout=0.2))
        assert error.code() == Code.DEADLINE_EXCEEDED
        await env.idle()
        chunks, stream = [], env.stub.GenerateStream(req, metadata=AUTH, timeout=0.2)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for chunk in stream:
                chunks.append(chunk)
        assert info.value.code() == Code.DEADLINE_EXCEEDED and 0 < len(chunks) < 200
        await env.idle()
        assert env.outcomes()["timeout"] == 2
    serve(test, token_delay=0.01)


def test_the_servers_own_timeout_caps_the_deadline(serve):
    async def test(env: Env):
        error = await refused(env.stub.Generate(pb2.GenerateRequest(prompt="x", max_tokens=200), metadata=AUTH))
        assert error.code() == Code.DEADLINE_EXCEEDED and "aborted" in error.details()
        await env.idle()
        assert env.outcomes()["timeout"] == 1
    serve(test, token_delay=0.01, settings={"request_timeout_s": 0.15})


def test_cancel_mid_stream_and_before_the_first_token_abort_the_job(serve):
    async def test(env: Env):
        stream = env.stub.GenerateStream(pb2.GenerateRequest(prompt="x", max_tokens=250), metadata=AUTH)
        assert (await stream.read()).text == "h"
        stream.cancel()
        assert await env.idle(within=1.0) < 1.0
        unary = asyncio.ensure_future(env.stub.Generate(pb2.GenerateRequest(prompt="x", max_tokens=250),
                                                        metadata=AUTH))
        while env.engine.stats()["running"] == 0:
            await asyncio.sleep(0.005)
        unary.cancel()
        await env.idle(within=1.0)
        assert env.engine.cancelled == 2 and env.outcomes()["cancelled"] == 2
        assert env.metrics.registry.get_sample_value("lifecycle_requests_in_flight", {"frontend": "grpc"}) == 0
        assert (await env.stub.Generate(pb2.GenerateRequest(prompt="x", max_tokens=3), metadata=AUTH)).text == "hel"
    serve(test, token_delay=0.01)


def test_engine_failure_mid_stream_ends_with_internal(serve):
    async def test(env: Env):
        chunks, stream = [], env.stub.GenerateStream(pb2.GenerateRequest(prompt="x", max_tokens=10), metadata=AUTH)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for chunk in stream:
                chunks.append(chunk.text)
        assert info.value.code() == Code.INTERNAL and "injected failure" in info.value.details()
        assert chunks == list("hel")  # what was sent before the failure, then the error: never a quiet stop
        error = await refused(env.stub.Generate(pb2.GenerateRequest(prompt="x", max_tokens=10), metadata=AUTH))
        assert error.code() == Code.INTERNAL and env.outcomes()["error"] == 2
        env.meter.flush()
        assert env.meter.statement(0, time.time() + 1)[0]["errors"] == 2
    serve(test, fail_after=3)


def test_settings_out_of_range_name_the_key():
    for bad in ({"max_tokens_cap": 0}, {"default_max_tokens": 9000}, {"max_message_bytes": 10}, {"port": -1},
                {"request_timeout_s": 0}):
        with pytest.raises(ConfigError, match=f"serve.grpc.{next(iter(bad))}="):
            GrpcSettings(**bad)


class Unlisted(EngineError):
    """A refusal kind the front end has never heard of (the real engine's InvalidPrompt, say)."""


class BrokenEngine(FakeEngine):
    """Fails the ways a real engine might: an unlisted refusal, a crash mid-stream, a stream cut short, a job
    dropped by the engine itself."""
    mode = ""

    async def generate(self, request):
        async with aclosing(super().generate(request)) as events:
            async for i, event in _enumerate(events):
                if self.mode == "refuse":
                    raise Unlisted("prompt token id 999 is outside the vocabulary")
                if i == 2 and self.mode == "crash":
                    raise RuntimeError("CUDA error: device-side assert")
                if i == 2 and self.mode == "shutdown":
                    event = Event(finish_reason="cancelled", prompt_tokens=1, completion_tokens=2)
                if i == 2 and self.mode == "cut":
                    return
                yield event


async def _enumerate(events):
    i = 0
    async for event in events:
        yield i, event
        i += 1


def test_engine_exceptions_and_short_streams_are_never_a_quiet_success(serve):
    async def test(env: Env):
        for mode, code, words in (("refuse", Code.INVALID_ARGUMENT, "outside the vocabulary"),
                                  ("crash", Code.INTERNAL, "device-side assert"),
                                  ("cut", Code.INTERNAL, "without a finish reason"),
                                  ("shutdown", Code.UNAVAILABLE, "retry")):
            env.engine.mode = mode
            for rpc in (env.stub.Generate, env.stub.GenerateStream):
                error = await refused(rpc(pb2.GenerateRequest(prompt="x", max_tokens=10), metadata=AUTH))
                assert error.code() == code and words in error.details(), (mode, error)
        await env.idle()
        assert (env.outcomes()["client_error"], env.outcomes()["error"], env.outcomes()["unavailable"]) == (2, 4, 2)
    serve(test, kind=BrokenEngine)


def test_l6_bounded_load_counts_agree(serve):
    """200 requests at concurrency 8 (= slots + queue), half streaming, every 10th cancelled after its first
    chunk: the client's tally by status equals the server's lifecycle_requests counters."""
    expected = ("hello world " * 2)[:16]

    async def one(env: Env, i: int, tally: dict, latencies: list) -> None:
        req = pb2.GenerateRequest(prompt=f"p{i}", max_tokens=200 if i % 10 == 9 else 16)
        started = time.monotonic()
        try:
            if i % 2 == 0:
                assert (await env.stub.Generate(req, metadata=AUTH)).text == expected
            else:
                stream, text = env.stub.GenerateStream(req, metadata=AUTH), ""
                async for chunk in stream:
                    text += chunk.text
                    if i % 10 == 9:
                        stream.cancel()
                        tally["cancelled"] += 1
                        return
                assert text == expected
            tally["ok"] += 1
            latencies.append(time.monotonic() - started)
        except grpc.aio.AioRpcError as e:
            assert e.code() == Code.RESOURCE_EXHAUSTED, e  # a slot a cancelled call held a moment longer
            tally["rejected"] += 1
            await asyncio.sleep(0.01)  # a polite client backs off

    async def test(env: Env):
        tally, latencies, queue = dict.fromkeys(OUTCOMES, 0), [], list(range(200))

        async def client():
            while queue:
                await one(env, queue.pop(), tally, latencies)
        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(8)))
        elapsed = time.monotonic() - started
        await env.idle()
        await asyncio.sleep(0.05)  # the last cancelled calls are recorded as their handlers unwind
        assert sum(tally.values()) == 200 and tally["ok"] >= 150 and tally["cancelled"] > 0
        assert env.outcomes() == tally
        assert env.metrics.registry.get_sample_value("lifecycle_requests_in_flight", {"frontend": "grpc"}) == 0
        latencies.sort()
        print(f"\nL6 gRPC: {200 / elapsed:.0f} req/s, ok p50 {statistics.median(latencies) * 1e3:.1f} ms, "
              f"p99 {latencies[int(0.99 * len(latencies))] * 1e3:.1f} ms, {tally}")
    serve(test, token_delay=0.001, max_batch_size=4, max_queue=4)


def test_grpc_resolves_the_aliases_rest_manages(serve, tmp_path):
    """`lifecycle serve` hands both front ends one AliasedEngine: an alias set over REST (/admin/aliases) is listed
    and resolved by gRPC too, and the REST app keeps the AliasedEngine it is given instead of wrapping another."""
    from lifecycle.serve.aliases import AliasedEngine
    from lifecycle.serve.rest import RestSettings, build_app

    shared = AliasedEngine(FakeEngine(adapters=("production-v1",)))
    app = build_app(shared, KeyStore({}), None, ServeMetrics(shared.stats, lambda: shared.ready), RestSettings())
    assert app.state.ctx.engine is shared

    async def test(env: Env):
        env.engine.aliases["production"] = "production-v1"  # what POST /admin/aliases does
        names = [m.name for m in (await env.stub.ListModels(pb2.ListModelsRequest(), metadata=AUTH)).models]
        assert "production" in names and "production-v1" in names
        r = await env.stub.Generate(pb2.GenerateRequest(prompt="hi", max_tokens=3, model="production"),
                                    metadata=AUTH)
        assert r.text and r.model == "production"
        del env.engine.aliases["production"]
        error = await refused(env.stub.Generate(pb2.GenerateRequest(prompt="hi", max_tokens=3, model="production"),
                                                metadata=AUTH))
        assert error.code() == Code.NOT_FOUND

    serve(test, kind=lambda **kw: AliasedEngine(FakeEngine(adapters=("production-v1",), **kw)))


def test_grpc_completions_carry_their_id_and_mean_logprob_into_the_usage_log(serve):
    """As over REST: the usage row of a gRPC completion keeps the id the client got (so POST /v1/feedback can rate
    it) and the tokens' mean log-prob (the monitor's confidence signal), though the client asked for no log-probs."""
    from sqlalchemy import select

    from lifecycle.serve.usage import requests_table

    async def test(env: Env):
        plain = await env.stub.Generate(pb2.GenerateRequest(prompt="hi", max_tokens=5), metadata=AUTH)
        assert plain.id.startswith("grpc-") and len(plain.text) == 5 and not plain.logprobs
        chunks = [c async for c in env.stub.GenerateStream(pb2.GenerateRequest(prompt="hi", max_tokens=4),
                                                            metadata=AUTH)]
        assert not any(c.logprobs for c in chunks)
        asked = await env.stub.Generate(pb2.GenerateRequest(prompt="hi", max_tokens=3, logprobs=0), metadata=AUTH)
        assert [lp.logprob for lp in asked.logprobs] == [-1.0] * 3
        env.meter.flush()
        with env.meter.engine.connect() as conn:
            rows = {r.request_id: r for r in conn.execute(select(requests_table))}
        assert set(rows) == {plain.id, chunks[0].id, asked.id}
        assert all(r.mean_logprob == -1.0 and r.frontend == "grpc" for r in rows.values())
        assert env.meter.record_feedback(plain.id, "alice", -1, "thumbs", True, None) > 0
    serve(test)
