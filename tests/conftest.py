"""Shared fixtures: no network, outputs in a temp dir, composed configs, one tiny data run per session."""
from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
                  TOKENIZERS_PARALLELISM="false", WANDB_SILENT="true")

from hydra import compose, initialize_config_dir  # noqa: E402

from lifecycle import CONF_DIR  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Tiny but real: the smoke recipe, 2 layers of width 64, a 1,024-token vocabulary.
TINY = ["experiment=smoke", "logger=none", "max_bytes=400000"]


def make_cfg(name: str, run_dir: Path, overrides: list[str] = ()):
    """Compose a stage config as the CLI would, with outputs under run_dir's parent."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(name, overrides=[f"paths.output_root={run_dir.parent.parent}", f"paths.run_dir={run_dir}",
                                        *overrides])


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m lifecycle.<stage> ...` as a user would."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(port: int, overrides: list[str], keys: str, ready_timeout: float = 120):
    """`python -m lifecycle.serve` with LIFECYCLE_API_KEYS=keys until /ready answers; yields (URL, process);
    SIGTERM (a drain) on the way out."""
    proc = subprocess.Popen([sys.executable, "-m", "lifecycle.serve", f"port={port}", *overrides], cwd=ROOT,
                            env={**os.environ, "LIFECYCLE_API_KEYS": keys}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while not _ready(url):
            assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "the server was not ready in time"
            time.sleep(0.3)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One finished tiny `lifecycle data` run shared by the session's training tests."""
    from lifecycle.data.stage import run

    run_dir = tmp_path_factory.mktemp("outputs") / "data" / "run0"
    run(make_cfg("data", run_dir, TINY))
    return run_dir


@pytest.fixture(scope="session")
def base_dir(data_dir, tmp_path_factory) -> Path:
    """A tiny model pretrained briefly (30 steps) on the shared data run: its exported model/ directory."""
    from lifecycle.pretrain.stage import run

    run_dir = tmp_path_factory.mktemp("outputs") / "pretrain" / "base"
    run(make_cfg("pretrain", run_dir, [*TINY, f"data.dir={data_dir}", "trainer.max_steps=30"]))
    return run_dir / "model"


def data_cfg(tmp_path: Path, *overrides: str, run: str = "r"):
    """A tiny data-stage config writing under tmp_path/out, with its own cache."""
    return make_cfg("data", tmp_path / "out" / "data" / run, [*TINY, *overrides])


SYLLABLES = "ka lo mi ren tas vor pel dun sar ith mo bel cran dis fen gol hur jat kem lun".split()
STOP = "the be to of and that have with".split()


def prose(seed: int, n_words: int = 220) -> str:
    """A distinct, filter-passing English-like paragraph per seed (no repeated n-grams)."""
    rng = random.Random(seed)
    words = []
    for i in range(n_words):
        words.append(rng.choice(STOP) if i % 4 == 0 else "".join(rng.choices(SYLLABLES, k=rng.randint(2, 3))))
    sentences = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, n_words, 12)]
    return " ".join(sentences)


def edit(text: str, rate: float, vocab: list[str], rng: random.Random) -> str:
    """`rate` of the words substituted, deleted or inserted (a third each, at random places)."""
    words = text.split()
    for _ in range(max(1, round(rate * len(words)))):
        i, op = rng.randrange(len(words)), rng.randrange(3)
        if op == 0:
            words[i] = rng.choice(vocab)
        elif op == 1:
            del words[i]
        else:
            words.insert(i, rng.choice(vocab))
    return " ".join(words)
