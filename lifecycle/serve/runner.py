"""Run a REST app on uvicorn with a drain on SIGTERM/SIGINT: readiness turns 503 at once, new requests get 503,
requests in flight finish (up to the drain timeout), then uvicorn shuts down and `serve` returns (exit 0).

    await serve(app, "127.0.0.1", 8000)                  # drain timeout from the app's RestSettings
    server = make_server(app, "127.0.0.1", 0); server.run()   # tests: server.port, server.drain()
"""
from __future__ import annotations

import logging
import signal
import time

import uvicorn

from lifecycle.serve.limits import ServeState

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's Server whose exit signals start a drain instead of closing the listener at once."""

    def __init__(self, config: uvicorn.Config, state: ServeState, drain_timeout: float):
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown and the exit status would be
        # 128 + 15 instead of 0. A second SIGINT still forces the exit.
        if self.state.draining and sig == signal.SIGINT:
            self.force_exit = self.should_exit = True
        self.drain()

    def drain(self) -> None:
        """Start draining (idempotent; safe from a signal handler or another thread)."""
        self.state.draining = True

    async def on_tick(self, counter: int) -> bool:
        if self.state.draining and not self.should_exit:
            now = time.monotonic()
            if self.drain_started is None:
                self.drain_started = now
                log.info("draining: %d request(s) in flight, up to %.0f s", self.state.active, self.drain_timeout)
            if self.state.active == 0 or now - self.drain_started > self.drain_timeout:
                if self.state.active:
                    log.warning("drain timeout: %d request(s) still in flight are cut off", self.state.active)
                self.should_exit = True
        return await super().on_tick(counter)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0), once started."""
        return self.servers[0].sockets[0].getsockname()[1]


def make_server(app, host: str, port: int, drain_timeout: float | None = None,
                log_level: str = "info") -> DrainingServer:
    """A DrainingServer for `app` (a build_app app); drain_timeout defaults to its settings.drain_timeout_s."""
    timeout = app.state.ctx.settings.drain_timeout_s if drain_timeout is None else drain_timeout
    # After the drain the connections are idle, so uvicorn's own graceful wait only has stragglers to cut.
    config = uvicorn.Config(app, host=host, port=port, lifespan="on", log_level=log_level,
                            timeout_graceful_shutdown=1, access_log=False)
    return DrainingServer(config, app.state.serve, timeout)


async def serve(app, host: str, port: int, drain_timeout: float | None = None, log_level: str = "info") -> None:
    """Serve `app` until SIGTERM/SIGINT, drain, shut down (engine stopped in the app's lifespan), return."""
    await make_server(app, host, port, drain_timeout, log_level).serve()
