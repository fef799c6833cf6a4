"""`lifecycle serve` as users run it: the stage in a subprocess on a tiny model, real clients (lm-evaluation-harness,
openai, gRPC stubs), a drain on SIGTERM, and fast failures for a corrupt model or a bad profile."""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import TINY, cli, free_port, make_cfg, serve_process

pytestmark = pytest.mark.integration
KEY = "sk-test-not-a-real-key"
EVAL = ["data.val_batches=2", "tasks.limit=8", "tasks.max_items=30", "samples.max_new_tokens=4",
        "samples.prompts=[def]", "gate.incumbent=null"]


@contextlib.contextmanager
def serving(run_dir: Path, *overrides: str):
    """The stage on free REST and gRPC ports until ready; yields (base URL, gRPC port, process)."""
    grpc_port = free_port()
    with serve_process(free_port(), [f"grpc.port={grpc_port}", f"hydra.run.dir={run_dir}",
                                     f"paths.output_root={run_dir.parent}", *overrides], KEY) as (url, proc):
        yield url, grpc_port, proc


def test_endpoint_evaluation_scores_equal_the_local_model(base_dir, data_dir, tmp_path, monkeypatch):
    """lm-eval's local-completions against our server gives the hf backend's scores on the same model."""
    from lifecycle.evaluate.stage import run as evaluate

    monkeypatch.setenv("LIFECYCLE_API_KEY", KEY)
    common = [*TINY, f"data.dir={data_dir}", f"target.model={base_dir}", *EVAL]
    local = evaluate(make_cfg("evaluate", tmp_path / "evaluate" / "local", common))
    with serving(tmp_path / "serve", f"deploy.engine.model={base_dir}") as (url, _, _):
        served = evaluate(make_cfg("evaluate", tmp_path / "evaluate" / "served",
                                   [*common, f"target.endpoint={url}/v1"]))
    scores = {k: v for k, v in local.items() if k.startswith("eval/task/") and k.endswith(("/acc", "/items"))}
    assert scores and all(v > 0 for k, v in scores.items() if k.endswith("/items"))
    for key, value in scores.items():
        assert served[key] == pytest.approx(value, abs=1e-9), key


def test_openai_client_grpc_and_a_drain_on_sigterm(base_dir, tmp_path):
    """Chat streaming through the official client and a gRPC call, the second through an alias set over REST;
    SIGTERM mid-stream: the stream still completes, the process exits 0 and its manifest counts what it served."""
    import grpc
    import httpx
    from openai import OpenAI

    from lifecycle.serve.auth import digest
    from lifecycle.serve.grpc_stubs import pb2, pb2_grpc

    chat_model = tmp_path / "chat_model"
    shutil.copytree(base_dir, chat_model)
    config = json.loads((chat_model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    (chat_model / "tokenizer_config.json").write_text(json.dumps(config))
    run_dir = tmp_path / "serve"
    with serving(run_dir, "deploy=both", f"deploy.engine.model={chat_model}", "deploy.engine.name=tiny",
                 f"auth.admin_key_ids=[key-{digest(KEY)[:8]}]") as (url, grpc_port, proc):
        client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
        chunks = list(client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "def add(a, b):"}], max_tokens=8, temperature=0,
            stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens > 0
        stub = pb2_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
        alias = httpx.post(f"{url}/admin/aliases", json={"alias": "production", "target": "tiny"},
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert alias.status_code == 200, alias.text
        reply = stub.Generate(pb2.GenerateRequest(model="production", prompt="import os\n", max_tokens=5,
                                                  temperature=0),
                              metadata=[("authorization", f"Bearer {KEY}")], timeout=30)
        assert reply.finish_reason == "length"

        finished = {}

        def long_stream():
            stream = client.completions.create(model="tiny", prompt="class A:\n", max_tokens=120, temperature=0,
                                               stream=True)
            finished["reasons"] = [c.choices[0].finish_reason for c in stream if c.choices]

        reader = threading.Thread(target=long_stream)
        reader.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        reader.join(timeout=60)
        assert proc.wait(timeout=60) == 0
    assert finished["reasons"][-1] == "length"  # in flight at SIGTERM, it was allowed to finish
    metrics = json.loads((run_dir / "manifest.json").read_text())["metrics"]
    # the chat stream, the alias call, the gRPC call and the long stream
    assert metrics["serve/requests_ok"] == 4 and metrics["serve/completion_tokens"] == 8 + 5 + 120


def test_the_edge_profile_serves_an_int8_variant(base_dir, data_dir, tmp_path):
    """deploy=edge on the int8 output of `lifecycle optimize`, measured by the self-check over real HTTP."""
    from lifecycle.optimize.stage import run as optimize

    variant = tmp_path / "optimize" / "int8"
    optimize(make_cfg("optimize", variant, [*TINY, "optimize=int8", f"source.model={base_dir}", f"data.dir={data_dir}",
                                             "bench.batch_sizes=[1]", "bench.repeats=1", "bench.new_tokens=4"]))
    out = cli("lifecycle.serve", "deploy=edge", f"deploy.engine.model={variant / 'model'}", "port=0", "logger=none",
              "check.requests=4", "check.concurrency=2", "check.max_tokens=8", f"hydra.run.dir={tmp_path / 'serve'}",
              f"usage.db=sqlite:///{tmp_path / 'usage.db'}", timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "serve" / "manifest.json").read_text())["metrics"]
    assert metrics["serve/check_ok"] == 4 and metrics["serve/completion_tokens"] > 0


def test_a_corrupt_model_fails_fast_naming_the_file(base_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(base_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    started = time.monotonic()
    out = cli("lifecycle.serve", f"deploy.engine.model={broken}", f"port={free_port()}",
              f"hydra.run.dir={tmp_path / 'run'}", env={"LIFECYCLE_API_KEYS": KEY}, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "model.safetensors" in out.stderr and time.monotonic() - started < 90


def test_a_bad_profile_fails_before_any_model_loads(tmp_path):
    out = cli("lifecycle.serve", "deploy.frontends=[http]", f"hydra.run.dir={tmp_path}", timeout=60)
    assert out.returncode == 2 and "deploy.frontends" in out.stderr
    out = cli("lifecycle.serve", "rest.cors_origins=[*]", f"hydra.run.dir={tmp_path}", timeout=60)
    assert out.returncode == 2 and "cors_origins" in out.stderr
