# The README's two commands: `make demo` (set up + run the default pipeline) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# W&B goes online by itself when WANDB_API_KEY is set; the tests force offline mode and no hub access.
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup prometheus demo smoke test test-slow bench clean

$(BIN)/lifecycle: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a plain `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q torch==2.13.0 -e '.[test]'
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	# gRPC stubs are generated from lifecycle/serve/proto, never committed (first import would do it too).
	$(BIN)/python -m lifecycle.serve.grpc_stubs
	touch $@

setup: $(BIN)/lifecycle prometheus

# Prometheus + promtool (Debian/Ubuntu apt) for `lifecycle monitor`'s integration test; only when missing, and a
# machine without apt (or without the rights) gets a warning: the rest of the project installs without it.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  if command -v apt-get >/dev/null 2>&1; then \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus || \
	    { $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus; } || \
	    echo "warning: could not install prometheus with apt; tests/integration/test_monitor_prometheus.py will skip"; \
	  else echo "warning: no apt-get: install prometheus yourself, or test_monitor_prometheus.py will skip"; fi; }

demo: setup
	$(BIN)/lifecycle pipeline

smoke: setup
	$(BIN)/lifecycle pipeline experiment=smoke

test: setup
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: setup
	$(BIN)/python -m pytest -m slow -q

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf outputs multirun .pytest_cache
