# The README's two commands: `make demo` (set up + run the default pipeline) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# W&B goes online by itself when WANDB_API_KEY is set; the tests force offline mode and no hub access.
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup prometheus demo smoke test test-slow bench bench-peers clean

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

# The benchmarks' peers, in their own venv (never project dependencies): datatrove (+ spacy, ftfy) and
# llama-cpp-python built from source (~13 min on 2 cores), whose source tree also holds the HF -> GGUF converter.
# AMX is off: a native build segfaulted on q8_0 on this AMX-INT8 CPU (benchmarks/decode_peers.py).
BENCH_VENV ?= .benchvenv
LLAMA_CPP_PYTHON ?= 0.3.36
bench-peers:
	$(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/pip install -q torch==2.13.0 datatrove spacy regex tokenizers orjson "xxhash<4" ftfy \
	  transformers==5.24.0 sentencepiece pyyaml
	$(BENCH_VENV)/bin/pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(BENCH_VENV)/src
	tar xzf $(BENCH_VENV)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(BENCH_VENV)/src
	# Each instruction set only where /proc/cpuinfo lists it (AMD's Zen 4 has AVX512-VNNI but not the VEX AVX-VNNI,
	# which would fault there); AMX always off (GGML_NATIVE=ON used it on the Intel host and q8_0 segfaulted).
	flags=" $$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null) "; \
	on() { case "$$flags" in *" $$1 "*) echo ON;; *) echo OFF;; esac; }; \
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=$$(on avx) -DGGML_AVX2=$$(on avx2) -DGGML_FMA=$$(on fma) \
	  -DGGML_F16C=$$(on f16c) -DGGML_AVX512=$$(on avx512f) -DGGML_AVX512_VBMI=$$(on avx512vbmi) \
	  -DGGML_AVX512_VNNI=$$(on avx512_vnni) -DGGML_AVX512_BF16=$$(on avx512_bf16) -DGGML_AVX_VNNI=$$(on avx_vnni) \
	  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" \
	  $(BENCH_VENV)/bin/pip install "$(BENCH_VENV)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz[server]"

clean:
	rm -rf outputs multirun .pytest_cache
