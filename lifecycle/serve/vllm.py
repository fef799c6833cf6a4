"""`deploy=vllm`: serve our artifacts with vLLM on GPU fleets (`vllm serve` on the model, adapters via --enable-lora)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from lifecycle.errors import ConfigError
from lifecycle.models.adapters import CONFIG_NAME, is_adapter_dir, read_config

INSTALL = ("vLLM is not installed here. On a Linux machine with an NVIDIA GPU: pip install vllm (it brings its own "
           "torch build, so use a separate virtual environment), then run this command again")
LORA_TYPES = ("LORA",)  # vLLM serves LoRA adapters only
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts


def command(model: str, adapters: dict[str, str] | None, host: str, port: int, max_model_len: int | None,
            dtype: str, tensor_parallel_size: int, extra_args: list[str], served_name: str | None) -> list[str]:
    """The `vllm serve` command line for a model directory and its LoRA adapters (checked before anything runs)."""
    model_dir = Path(model)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"engine.model={model}: not a model directory (no config.json); vLLM serves a transformers "
                          "model directory such as outputs/pretrain/latest/model or an optimize variant")
    adapters = adapters or {}
    cmd = ["vllm", "serve", str(model_dir.resolve()), "--host", host, "--port", str(port), "--dtype", dtype,
           "--tensor-parallel-size", str(tensor_parallel_size), "--served-model-name", served_name or model_dir.name]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if adapters:
        cmd += ["--enable-lora", "--max-lora-rank", str(_max_rank(adapters)), "--lora-modules"]
        cmd += [f"{name}={Path(path).resolve()}" for name, path in adapters.items()]
    return cmd + list(extra_args)


def _max_rank(adapters: dict[str, str]) -> int:
    ranks = []
    for name, path in adapters.items():
        if not is_adapter_dir(path):
            raise ConfigError(f"engine.adapters.{name}={path}: not an adapter directory (no {CONFIG_NAME})")
        config = read_config(Path(path))
        if config.get("peft_type") not in LORA_TYPES:
            raise ConfigError(f"engine.adapters.{name}: a {config.get('peft_type')} adapter; vLLM serves LoRA "
                              "adapters only. Merge it with `lifecycle optimize optimize=merge` or serve it with "
                              "deploy=rest")
        ranks.append(int(config.get("r", 8)))
    return next(r for r in VLLM_RANKS if r >= max(ranks))


def launch(cmd: list[str]) -> None:
    """Replace this process with vLLM's server (it handles signals and draining itself)."""
    if shutil.which(cmd[0]) is None:
        raise ConfigError(INSTALL)
    os.execvp(cmd[0], cmd)
