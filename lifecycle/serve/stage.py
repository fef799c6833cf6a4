"""`lifecycle serve`: build the deploy profile's engine, put the REST and/or gRPC front ends over it, serve until
SIGTERM/SIGINT (drained), then write the run's manifest with what was served."""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import time
from pathlib import Path

from omegaconf import DictConfig

from lifecycle import artifacts, tracking
from lifecycle.config import build, resolved, validate
from lifecycle.errors import CheckpointError, ConfigError
from lifecycle.serve.auth import KeyStore
from lifecycle.serve.metrics import ServeMetrics
from lifecycle.serve.usage import UsageMeter

STAGE = "serve"
log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    validate(cfg, STAGE)
    if cfg.deploy.vllm is not None:
        return _vllm(cfg)
    started, config = time.time(), resolved(cfg)
    rest_settings, grpc_settings = build(cfg.rest), build(cfg.grpc)  # range checks before the model loads
    keys = KeyStore.from_sources(cfg.auth.env_var, cfg.auth.keys_file)
    check_key = secrets.token_urlsafe(24) if cfg.check.requests else None
    if check_key:
        if "rest" not in cfg.deploy.frontends:
            raise ConfigError("check.requests: the self-check speaks REST; use deploy=rest or deploy=both")
        keys = keys.with_key(check_key, "self-check")
    elif not len(keys):
        log.warning("no API keys: every request will get 401. Export %s=<key>[,<key>...] or set auth.keys_file",
                    cfg.auth.env_var)
    run_dir = artifacts.start_run(cfg.paths.run_dir, config)
    engine = build(cfg.deploy.engine)
    meter = UsageMeter(cfg.usage.db, cfg.usage.log_text)
    metrics = ServeMetrics(engine.stats, lambda: engine.ready)
    try:
        checked = asyncio.run(_serve(cfg, engine, keys, meter, metrics, rest_settings, grpc_settings, check_key))
    finally:
        meter.close()
    summary = {**_summary(metrics, started), **checked}
    inputs = {"model": _model_record(cfg.deploy.engine)}
    logger = tracking.make_logger(cfg.logger, run_dir, STAGE, cfg.name, config)  # after serving: no W&B start-up delay
    if logger is not None:
        logger.log_metrics(summary)
        tracking.link_lineage(logger, run_dir, tracking.record_paths(inputs["model"]),
                              {"deployment": run_dir / "config.yaml"}, cfg.name, summary)
    artifacts.finish_run(run_dir, STAGE, inputs, summary, config, started, tracking.run_id(logger))
    tracking.finish(logger)
    print("served: " + ", ".join(f"{k.removeprefix('serve/')} {v}" for k, v in summary.items()))
    return summary


async def _serve(cfg, engine, keys, meter, metrics, rest_settings, grpc_settings, check_key) -> dict:
    """Both front ends share the engine, and its model aliases (managed over REST, resolved by both); it starts
    once, and stops only after both have drained. Returns the self-check's figures (check.requests > 0) or {}."""
    from lifecycle.serve.aliases import AliasedEngine
    from lifecycle.serve.runner import make_server

    shared = AliasedEngine(_Unstoppable(engine))
    grpc_server, checked = None, {}
    if "grpc" in cfg.deploy.frontends:
        from lifecycle.serve.grpc_server import build_server

        grpc_server = build_server(shared, keys, meter, metrics, grpc_settings)
        await grpc_server.start()
        print(f"gRPC: {grpc_settings.host}:{grpc_settings.port}", flush=True)
    try:
        if "rest" in cfg.deploy.frontends:
            from lifecycle.serve.rest import build_app

            app = build_app(shared, keys, meter, metrics, rest_settings)
            server = make_server(app, cfg.host, cfg.port)
            watch = asyncio.create_task(_fail_fast(app.state.serve, server))
            check = asyncio.create_task(_check(cfg, engine, server, check_key)) if check_key else None
            print(f"REST: http://{cfg.host}:{cfg.port}/v1", flush=True)
            await server.serve()
            watch.cancel()
            checked = check.result() if check is not None and check.done() else {}
            if app.state.serve.load_error:
                raise CheckpointError(f"the model failed to load: {app.state.serve.load_error}")
        else:
            await engine.start()
            await _until_signal()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(cfg.limits.drain_timeout_s)
        await engine.stop()
    return checked


async def _check(cfg, engine, server, key: str) -> dict:
    """Wait until ready, run the self-check against our own REST port, print it, then end the process (drained)."""
    from lifecycle.serve.check import self_check

    try:
        while not engine.ready:
            await asyncio.sleep(0.1)
        c = cfg.check
        figures = await self_check(f"http://{cfg.host}:{server.port}", key, c.model or engine.model_names()[0],
                                   c.requests, c.concurrency, c.max_tokens)
        print("self-check: " + ", ".join(f"{k.removeprefix('serve/')} {v}" for k, v in figures.items()), flush=True)
        return figures
    finally:
        server.should_exit = True


async def _fail_fast(state, server) -> None:
    """A model that cannot load ends the process (exit 2, naming the file) instead of staying unready forever."""
    while state.load_error is None:
        await asyncio.sleep(0.1)
    server.should_exit = True


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


class _Unstoppable:
    """The engine as the front ends see it: everything but stop(), which the stage calls once both have drained."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def stop(self) -> None:
        return None


def _summary(metrics: ServeMetrics, started: float) -> dict:
    """What this run served, from its own Prometheus counters."""
    out: dict = {"serve/uptime_s": round(time.time() - started, 1)}
    for sample in metrics.requests.collect()[0].samples:
        if sample.name.endswith("_total"):
            key = f"serve/requests_{sample.labels['outcome']}"
            out[key] = out.get(key, 0) + int(sample.value)
    for name, counter in (("prompt_tokens", metrics.prompt_tokens), ("completion_tokens", metrics.completion_tokens)):
        out[f"serve/{name}"] = int(sum(s.value for s in counter.collect()[0].samples if s.name.endswith("_total")))
    return out


def _model_record(engine_node) -> dict:
    """The served model (and adapters) by path and content hash; a hybrid records both of its engines."""
    if "small" in engine_node:
        return {"small": _model_record(engine_node.small), "large": _model_record(engine_node.large)}
    record = {"model": artifacts.input_record(Path(engine_node.model))}
    for name, path in (engine_node.adapters or {}).items():
        record[f"adapter/{name}"] = artifacts.input_record(Path(path))
    return record


def _vllm(cfg: DictConfig) -> dict:
    """deploy=vllm: check and print the command, pass our one API key on as VLLM_API_KEY, hand the process over."""
    from lifecycle.serve.vllm import launch

    cmd = build(cfg.deploy.vllm)
    keys = [k for k in os.environ.get(cfg.auth.env_var or "", "").split(",") if k.strip()]
    if len(keys) > 1 or cfg.auth.keys_file:
        raise ConfigError("deploy=vllm: vLLM checks a single API key (VLLM_API_KEY); give exactly one key in "
                          f"${cfg.auth.env_var} and no auth.keys_file")
    if keys:
        os.environ["VLLM_API_KEY"] = keys[0].split(":", 1)[-1].strip()
    print("$ " + " ".join(cmd), flush=True)
    launch(cmd)
    return {}
