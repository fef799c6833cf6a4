"""The model a variant starts from: a model directory, or an adapter directory on its base model directory."""
from __future__ import annotations

import json
from pathlib import Path

from lifecycle.errors import ConfigError
from lifecycle.models.adapters import is_adapter_dir, read_config
from lifecycle.optimize.passes import Facts


def resolve(model: str, base: str | None) -> tuple[Path, Path | None]:
    """(model or adapter dir, the adapter's base dir or None), checked to exist before anything loads."""
    path = Path(model).expanduser()
    if not (path / "config.json").is_file() and not is_adapter_dir(path):
        raise ConfigError(f"source.model={model}: not a model directory (no config.json) nor an adapter directory "
                          "(no adapter_config.json); e.g. source.model=outputs/pretrain/latest/model or "
                          "source.model=outputs/finetune/latest/adapter")
    if not is_adapter_dir(path):
        return path, None
    recorded = read_config(path).get("base_model_name_or_path")
    base_path = Path(base or recorded or "").expanduser()
    if not (base_path / "config.json").is_file():
        raise ConfigError(f"source.base={base}: adapter {path} needs its base model directory (it records "
                          f"{recorded!r}); set source.base=DIR")
    return path, base_path


def facts(model_dir: Path, base_dir: Path | None) -> Facts:
    """What the source is, from its config files only."""
    config = json.loads(((base_dir or model_dir) / "config.json").read_text())
    adapter = read_config(model_dir).get("peft_type") if base_dir else None
    return Facts(model_type=config.get("model_type", "?"), config=config, adapter=adapter)


def load(model_dir: Path, base_dir: Path | None):
    """(model, tokenizer): the model directory through load_model, or the base with the adapter loaded onto it."""
    from transformers import AutoTokenizer

    from lifecycle.models.adapters import load_adapter
    from lifecycle.models.load import load_model

    if base_dir is None:
        return load_model(model_dir)
    model, tokenizer = load_model(base_dir)
    if (model_dir / "tokenizer.json").is_file():  # fine-tuning saves its tokenizer (with chat template) beside
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return load_adapter(model, model_dir).eval(), tokenizer


def record(model_dir: Path, base_dir: Path | None) -> dict:
    """The manifest's inputs entry: paths with content hashes."""
    from lifecycle import artifacts

    entry = {"model": artifacts.input_record(model_dir)}
    return {**entry, "base": artifacts.input_record(base_dir)} if base_dir else entry
