"""What is evaluated: a model directory, an adapter directory on its base, or an OpenAI-compatible endpoint."""
from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lifecycle import artifacts
from lifecycle.errors import ConfigError, DataError
from lifecycle.models.adapters import is_adapter_dir, read_config

ENDPOINT_TIMEOUT_S = 3.0
MODEL_DIRS = ("a pretrain or finetune run directory, outputs/pretrain/<run>/model, outputs/finetune/<run>/model or "
              "merged/, outputs/finetune/<run>/adapter")


@dataclass
class Target:
    kind: str                    # "model" | "adapter" | "endpoint"
    path: Path                   # the model or adapter directory (for an endpoint: where its tokenizer is)
    base: Path | None = None     # an adapter's base model directory
    endpoint: str | None = None
    endpoint_model: str | None = None
    key_env: str | None = None   # the environment variable holding the endpoint's API key (never the key)

    def headers(self) -> dict[str, str]:
        """The endpoint's Authorization header, when the key's environment variable is set."""
        return endpoint_headers(self.key_env)

    def record(self) -> dict:
        """The manifest's inputs entry: paths with content hashes, the endpoint by URL and model name."""
        if self.kind == "endpoint":
            return {"endpoint": self.endpoint, "model": self.endpoint_model, "tokenizer": str(self.path.resolve())}
        record = {self.kind: artifacts.input_record(self.path)}
        return {**record, "base": artifacts.input_record(self.base)} if self.base else record


def endpoint_headers(key_env: str | None) -> dict[str, str]:
    key = os.environ.get(key_env) if key_env else None
    return {"Authorization": f"Bearer {key}"} if key else {}


def resolve(model: str, base: str | None, endpoint: str | None, endpoint_model: str | None,
            key_env: str | None = None) -> Target:
    """Check the target before anything heavy loads: directories complete, adapter base present, endpoint alive."""
    path = _run_output(Path(model).expanduser())
    if not path.is_dir():
        raise ConfigError(f"target.model={model}: no such directory; give a model or adapter directory "
                          f"({MODEL_DIRS}), e.g. target.model=outputs/pretrain/latest/model")
    if endpoint:
        _require_files(path, "target.model", {"a tokenizer (tokenizer.json)": ["tokenizer.json"]})
        url = endpoint.rstrip("/")
        return Target("endpoint", path, endpoint=url, key_env=key_env,
                      endpoint_model=_endpoint_model(url, endpoint_model, endpoint_headers(key_env), key_env))
    if not is_adapter_dir(path):
        _check_model_dir(path, "target.model")
        return Target("model", path)
    recorded = read_config(path).get("base_model_name_or_path")
    base_path = Path(base or recorded or "").expanduser()
    if not (base or recorded) or not base_path.is_dir():
        given = "no such directory" if base else f"adapter {path} records base {recorded!r}, not a local directory"
        raise ConfigError(f"target.base={base}: {given}; set target.base=DIR to the model directory the adapter "
                          "was trained on")
    _check_model_dir(base_path, "target.base")
    return Target("adapter", path, base=base_path)


def _run_output(path: Path) -> Path:
    """A pretrain/finetune run directory stands for what it exported: model/, else adapter/."""
    if (path / "manifest.json").is_file():
        for name in ("model", "adapter"):
            if (path / name).is_dir():
                return path / name
    return path


def _check_model_dir(path: Path, key: str) -> None:
    _require_files(path, key, {"config.json": ["config.json"], "weights (*.safetensors)": ["*.safetensors", "*.bin"],
                               "a tokenizer (tokenizer.json)": ["tokenizer.json"]})


def _require_files(path: Path, key: str, wanted: dict[str, list[str]]) -> None:
    missing = [what for what, patterns in wanted.items() if not any(any(path.glob(p)) for p in patterns)]
    if missing:
        raise DataError(f"{key}={path} is incomplete: it has no {', '.join(missing)}. Point it at a directory written "
                        f"by save_pretrained ({MODEL_DIRS}), or re-run the stage that wrote it")


def _endpoint_model(url: str, name: str | None, headers: dict[str, str], key_env: str | None) -> str:
    """GET <url>/models within a few seconds: the served model names; a dead endpoint fails here, not mid-run."""
    try:
        request = urllib.request.Request(f"{url}/models", headers=headers)
        with urllib.request.urlopen(request, timeout=ENDPOINT_TIMEOUT_S) as response:
            listed = [m["id"] for m in json.load(response).get("data", []) if isinstance(m, dict) and "id" in m]
    except (OSError, ValueError) as e:  # refused, timed out, HTTP error status, not JSON
        reason = getattr(e, "reason", None) or e
        if getattr(e, "code", None) == 401:
            raise ConfigError(f"target.endpoint={url}: 401 unauthorized; export the server's API key in "
                              f"${key_env} (target.endpoint_key_env names the variable)") from None
        raise ConfigError(f"target.endpoint={url}: not reachable (GET {url}/models: {reason}); start the server "
                          "(lifecycle serve) or fix the URL (an OpenAI-compatible base URL ending in /v1)") from None
    if name and listed and name not in listed:
        raise ConfigError(f"target.endpoint_model={name}: {url} serves {', '.join(listed)}; pick one of them")
    if not (name or listed):
        raise ConfigError(f"target.endpoint={url}: /models lists no model; set target.endpoint_model=NAME")
    return name or listed[0]


def load(target: Target):
    """(model, tokenizer) in eval mode on the best device; an adapter is loaded onto its base, not merged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lifecycle.models.adapters import load_adapter

    model = AutoModelForCausalLM.from_pretrained(target.base or target.path, dtype=torch.float32)
    if target.kind == "adapter":
        model = load_adapter(model, target.path)
    tokenizer_dir = target.path if (target.path / "tokenizer.json").is_file() else target.base
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer
