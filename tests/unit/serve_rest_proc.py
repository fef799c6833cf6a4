"""A REST server around the fake engine as its own process, for the SIGTERM/drain tests:
`python serve_rest_proc.py PORT COUNTERS_JSON TOKEN_DELAY DRAIN_TIMEOUT`. After the drain it writes
lifecycle_requests_total per route and outcome to COUNTERS_JSON and exits 0."""
from __future__ import annotations

import asyncio
import json
import sys

from serve_rest_live import make_app

from lifecycle.serve.runner import serve
from lifecycle.serve.testing import FakeEngine


def counters(metrics) -> dict:
    out: dict = {}
    for sample in metrics.requests.collect()[0].samples:
        if sample.name.endswith("_total"):
            route = out.setdefault(sample.labels["route"], {})
            route[sample.labels["outcome"]] = route.get(sample.labels["outcome"], 0) + int(sample.value)
    return out


def main(port: int, out: str, token_delay: float, drain: float) -> None:
    engine = FakeEngine(token_delay=token_delay, max_batch_size=16, max_queue=16)
    app, metrics, _ = make_app(engine, drain_timeout_s=drain)
    asyncio.run(serve(app, "127.0.0.1", port, log_level="warning"))
    with open(out, "w") as f:
        json.dump(counters(metrics), f)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
