"""The one adapter loader: PEFT-style directories holding our bottleneck adapters or any of PEFT's own types."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from lifecycle.errors import CheckpointError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BOTTLENECK = "BOTTLENECK"  # peft_type of lifecycle.training.bottleneck; PEFT cannot register new type names
# What an adapter records about its base: two bases that differ here cannot share an adapter.
FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
PEFT_KEY_PREFIX = "base_model.model."  # PEFT saves tensors under the PeftModel attribute path

log = logging.getLogger(__name__)


def is_adapter_dir(path) -> bool:
    """Whether `path` is a PEFT-style adapter directory (it has an adapter_config.json)."""
    return (Path(path) / CONFIG_NAME).is_file()


def load_adapter(base_model, directory, adapter_name: str = "default"):
    """Load the adapter in `directory` onto `base_model` as `adapter_name`; returns the adapted model.

    Adapters load frozen (PEFT's default); a model already holding adapters of the same kind gains one more, with the
    active adapter unchanged (switch with `set_adapter`).
    """
    directory = Path(directory)
    config = read_config(directory)
    require_safetensors(directory)
    if config.get("peft_type") == BOTTLENECK:
        from lifecycle.training.bottleneck import load_bottleneck

        return load_bottleneck(base_model, directory, adapter_name)
    return _load_peft(base_model, directory, adapter_name, config)


def read_config(directory: Path) -> dict:
    """The adapter_config.json of `directory` as a dict."""
    if not is_adapter_dir(directory):
        raise CheckpointError(f"{directory} is not an adapter directory: it has no {CONFIG_NAME} "
                              "(PEFT's save_pretrained and lifecycle's save_bottleneck write one)")
    try:
        return json.loads((directory / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{directory / CONFIG_NAME}: not valid JSON ({e}); save the adapter again") from None


def require_safetensors(directory: Path) -> None:
    """Refuse adapters whose weights exist only as a pickle: unpickling can run code."""
    if (directory / WEIGHTS_NAME).is_file():
        return
    found = "only a pickled adapter_model.bin" if (directory / "adapter_model.bin").exists() else "no weights file"
    raise CheckpointError(
        f"{directory} has {found}: adapters are loaded only from {WEIGHTS_NAME} (safetensors is required; a pickle "
        "can run code when loaded). If you trust the file, convert it once: python -c \"import torch; "
        "from safetensors.torch import save_file; "
        "save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\"")


def base_name(model) -> str | None:
    """The hub name or path the model was loaded from, if it records one."""
    return getattr(getattr(model, "config", None), "name_or_path", None) or None


def base_fingerprint(model) -> dict:
    """The base-model facts an adapter depends on, read from its transformers config."""
    config = getattr(model, "config", None)
    return {key: getattr(config, key, None) for key in FINGERPRINT_KEYS}


def check_base(directory: Path, recorded_name: str | None, recorded: dict | None, base_model) -> None:
    """Raise if the base differs from the one the adapter recorded; warn if only its name or path differs."""
    given = base_fingerprint(base_model)
    differing = [f"{key} {recorded.get(key)} vs {given[key]}" for key in FINGERPRINT_KEYS
                 if recorded and recorded.get(key) != given[key]]
    if differing:
        raise mismatch(directory, recorded_name, base_model, ", ".join(differing))
    _warn_other_name(directory, recorded_name, base_model)


def mismatch(directory: Path, recorded_name: str | None, base_model, detail: str) -> CheckpointError:
    """The error for an adapter loaded onto a base it was not trained on, naming both."""
    return CheckpointError(
        f"adapter {directory} was trained on base {recorded_name or '(unnamed)'}, which differs from the given base "
        f"{base_name(base_model) or '(unnamed)'} ({detail}). Load it onto the base it was trained on "
        f"(base_model_name_or_path in {directory / CONFIG_NAME}), or train a new adapter on this base")


def _warn_other_name(directory: Path, recorded_name: str | None, base_model) -> None:
    # Names are paths as often as hub ids, and a moved copy is the same base, so a name alone does not refuse.
    given = base_name(base_model)
    if recorded_name and given and recorded_name != given:
        log.warning("adapter %s records base %s but is loaded onto %s (same architecture and sizes)",
                    directory, recorded_name, given)


def _load_peft(base_model, directory: Path, adapter_name: str, config: dict):
    """PEFT's own adapter types, after checking their saved LoRA shapes against the base."""
    import peft

    from lifecycle.training.bottleneck import BottleneckModel

    if isinstance(base_model, BottleneckModel):
        raise CheckpointError(f"cannot load PEFT adapter {directory} ({config.get('peft_type')}) beside bottleneck "
                              "adapters on one model: load it onto a fresh base")
    is_peft = isinstance(base_model, peft.PeftModel)
    problems = _lora_shape_problems(base_model.get_base_model() if is_peft else base_model, directory)
    if problems:
        raise mismatch(directory, config.get("base_model_name_or_path"), base_model, "; ".join(problems[:3]))
    _warn_other_name(directory, config.get("base_model_name_or_path"), base_model)
    try:
        if is_peft:
            base_model.load_adapter(str(directory), adapter_name)
            return base_model
        return peft.PeftModel.from_pretrained(base_model, str(directory), adapter_name=adapter_name)
    except RuntimeError as e:  # other PEFT types: their tensor shapes are checked only as they load
        if "size mismatch" not in str(e):
            raise
        detail = next(line.strip() for line in str(e).splitlines() if "size mismatch" in line)
        raise mismatch(directory, config.get("base_model_name_or_path"), base_model, detail) from None


def _lora_shape_problems(model, directory: Path) -> list[str]:
    """Saved lora_A/lora_B tensors whose module is missing from `model` or has other in/out features."""
    from safetensors import safe_open

    modules = dict(model.named_modules())
    problems = []
    with safe_open(directory / WEIGHTS_NAME, framework="pt") as f:
        for key in f.keys():
            path, _, rest = key.removeprefix(PEFT_KEY_PREFIX).partition(".lora_")
            if rest not in ("A.weight", "B.weight"):
                continue
            if path not in modules:
                problems.append(f"the base has no module {path}")
                continue
            layer = modules[path]
            features = _in_out_features(layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer)
            shape = f.get_slice(key).get_shape()  # lora_A: (r, in_features), lora_B: (out_features, r)
            saved, wanted = (shape[1], features[0]) if rest == "A.weight" else (shape[0], features[1])
            if wanted is not None and saved != wanted:
                problems.append(f"{path} has {wanted} {'in' if rest == 'A.weight' else 'out'} features, "
                                f"the adapter {saved}")
    return problems


def _in_out_features(layer) -> tuple[int | None, int | None]:
    if hasattr(layer, "in_features"):
        return layer.in_features, layer.out_features
    if type(layer).__name__ == "Conv1D":  # GPT-2's transposed Linear: weight is (in, out)
        return tuple(layer.weight.shape)
    return None, None
