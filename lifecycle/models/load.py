"""The one model loader: a plain transformers model directory or any `lifecycle optimize` variant directory.

Serving, reports and tests call `load_model`. Weights load only from safetensors (a pickle can run code when loaded),
and every file is checked against the config before a tensor is read, so a truncated file or a config that does not
fit its weights fails at once, naming the file.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from lifecycle.errors import CheckpointError
from lifecycle.models import int8

VARIANT = "optimize.json"  # written by `lifecycle optimize`: the passes applied, the int8 record, compile settings
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def load_model(directory, device: str = "cpu"):
    """(model in eval mode on `device`, tokenizer) from a model or optimize-variant directory."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    directory = Path(directory)
    _require_model_dir(directory)
    variant = read_variant(directory)
    quant = variant.get("quantization")
    if quant and device != "cpu":
        raise CheckpointError(f"{directory}: an int8 variant ({quant['library']}) runs on CPU only; load it with "
                              "device='cpu', or serve the unquantized model on the GPU")
    config = AutoConfig.from_pretrained(directory)
    files = sorted(directory.glob("*.safetensors"))
    saved = {}
    for path in files:
        saved |= {key: (shape, path) for key, shape in header_shapes(path).items()}
    if getattr(config, "quantization_config", None):  # 4-bit (bitsandbytes) packs weights: transformers checks them
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(directory, device_map=device, use_safetensors=True)
        return model.eval(), AutoTokenizer.from_pretrained(directory)
    _check_fit(directory, config, saved, quant)
    if quant:
        model = _load_int8(directory, config, quant)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, use_safetensors=True)
    model = model.to(device).eval()
    if variant.get("compile"):  # compiled code cannot be saved: the variant records how to compile on load
        model.compile(**variant["compile"])
    return model, AutoTokenizer.from_pretrained(directory)


def read_variant(directory: Path) -> dict:
    """The variant record of an optimize output ({} for a plain model directory)."""
    path = Path(directory) / VARIANT
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); re-run `lifecycle optimize`") from None


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, after checking the file holds every byte it declares."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        raw = f.read(n) if 0 <= n <= size - 8 else b""
    try:
        header = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (its header is cut or corrupt); "
                              "copy or save the model again")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 8 + n + max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if end > size:
        raise CheckpointError(f"{path}: truncated ({size:,} bytes, its header declares {end:,}); "
                              "copy or save the model again")
    return {k: tuple(v["shape"]) for k, v in tensors.items()}


def _require_model_dir(directory: Path) -> None:
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such model directory")
    if (directory / "adapter_config.json").is_file():
        raise CheckpointError(f"{directory} is an adapter, not a model: merge it into its base first "
                              f"(lifecycle optimize source.model={directory} optimize=merge) or load its merged/ copy")
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json; point at a directory written by save_pretrained "
                              "(outputs/pretrain/latest/model, outputs/finetune/latest/merged) or an optimize variant")
    if not any(directory.glob("*.safetensors")):
        pickles = [p.name for pattern in PICKLES for p in directory.glob(pattern)]
        found = f"only pickled weights ({', '.join(pickles)})" if pickles else "no weights file"
        raise CheckpointError(f"{directory} has {found}: models load only from safetensors (a pickle can run code "
                              "when loaded). If you trust the file, convert it once with "
                              "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")


def _check_fit(directory: Path, config, saved: dict, quant: dict | None) -> None:
    """Every saved tensor must exist in the model the config builds, with the same shape, and none may be missing."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    tied = set(getattr(skeleton, "_tied_weights_keys", None) or ()) if config.tie_word_embeddings else set()
    for name in (quant or {}).get("quantized", []):
        expected[f"{name}{int8.SCALE}"] = expected[f"{name}.weight"][:1]  # one scale per output channel
        tied.discard(f"{name}.weight")  # a quantized head is stored apart from the embedding
    problems = [f"{path.name} holds {key} {list(shape)}, the config builds {list(expected[key])}"
                for key, (shape, path) in saved.items() if key in expected and expected[key] != shape]
    problems += [f"{path.name} holds {key}, which the config's model does not have"
                 for key, (shape, path) in saved.items() if key not in expected]
    problems += [f"no file holds {key}" for key in expected if key not in saved and key not in tied]
    if problems:
        raise CheckpointError(f"{directory}: config.json does not fit the weights ({'; '.join(problems[:3])}"
                              f"{'; ...' if len(problems) > 3 else ''}); the files come from different models: "
                              "save the model again with save_pretrained")


def _load_int8(directory: Path, config, quant: dict):
    """Rebuild the int8 model: a float skeleton from the config, its quantized Linears refilled from the file."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # a transformers without it: a randomly initialised skeleton, refilled all the same
        no_init_weights = contextlib.nullcontext
    # Allocated, not initialised: the file refills every float tensor (_check_fit made sure it holds them all) and
    # the quantized Linears replace theirs, whose pages are then never touched. A randomly initialised skeleton
    # wrote the whole float model first: +535 MB of RSS for a 120M Llama, where this adds 78.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    return int8.rebuild(model, load_file(directory / quant["file"]), quant["quantized"])
