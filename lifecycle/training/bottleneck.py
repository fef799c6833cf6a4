"""Bottleneck adapters (Houlsby et al., 2019) built on PEFT's tuner base classes.

Each wrapped projection returns y + scaling * up(act(down(dropout(y)))) for its own output y. `up` starts at zero, so a
new adapter leaves the model exactly as it was. PEFT 0.21 registers only names of its `PeftType` enum, so the tuner
lives here; it behaves like PEFT's methods (named adapters, `set_adapter`, enable/disable, `unload`) and saves PEFT's
directory layout, which `lifecycle.models.adapters.load_adapter` reads beside PEFT's own types.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from peft import PeftModel
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from lifecycle.errors import CheckpointError, ConfigError
from lifecycle.models.adapters import (BOTTLENECK, CONFIG_NAME, PEFT_KEY_PREFIX, WEIGHTS_NAME, base_fingerprint,
                                       base_name, check_base, require_safetensors)

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
_NO_MERGE = ("bottleneck adapters cannot be merged into the base weights: up(act(down(y))) is not linear. "
             "Serve the base with the adapter loaded (lifecycle.models.adapters.load_adapter), or use LoRA if a "
             "merged model is needed")


@dataclass(kw_only=True)
class BottleneckConfig(PeftConfig):
    """Size, activation and placement of one bottleneck adapter; saved as adapter_config.json."""

    bottleneck_size: int
    non_linearity: str
    dropout: float
    target_modules: list[str]  # module-name suffixes, e.g. ["o_proj", "down_proj"] (Llama), ["c_proj"] (GPT-2)
    scaling: float
    peft_type: str = BOTTLENECK
    task_type: str = "CAUSAL_LM"
    base_model_fingerprint: dict | None = None  # filled by add_bottleneck, checked on load

    def __post_init__(self):
        super().__post_init__()
        self.target_modules = list(self.target_modules)  # Hydra passes a ListConfig
        if self.bottleneck_size < 1:
            raise ConfigError(f"bottleneck_size={self.bottleneck_size}: must be at least 1")
        if self.non_linearity not in _ACTIVATIONS:
            raise ConfigError(f"non_linearity={self.non_linearity!r}: choose one of {sorted(_ACTIVATIONS)}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout}: must be in [0, 1)")
        if not self.target_modules:
            raise ConfigError("target_modules is empty: name the projections to wrap, e.g. [o_proj, down_proj]")

    @classmethod
    def from_pretrained(cls, directory) -> BottleneckConfig:
        """Read adapter_config.json (PEFT's own reader knows only PeftType names)."""
        saved = json.loads((Path(directory) / CONFIG_NAME).read_text())
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{key: value for key, value in saved.items() if key in names})
        except TypeError as e:  # a required field is missing
            raise CheckpointError(f"{Path(directory) / CONFIG_NAME}: not a bottleneck adapter config ({e}); "
                                  "save the adapter again with save_bottleneck") from None


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """A Linear or GPT-2 Conv1D whose output passes through named bottleneck adapters, residually."""

    adapter_layer_names = ("adapter_down", "adapter_up")
    other_param_names = ("adapter_act", "adapter_dropout", "scaling")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig):
        super().__init__()
        self.base_layer = base_layer
        self.out_features = base_layer.nf if isinstance(base_layer, Conv1D) else base_layer.out_features
        self.adapter_down, self.adapter_up = nn.ModuleDict(), nn.ModuleDict()
        self.adapter_act, self.adapter_dropout = nn.ModuleDict(), nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BottleneckConfig) -> None:
        """Add one named adapter: `down` as nn.Linear initialises it, `up` all zeros (an exact identity at start)."""
        self.adapter_down[adapter_name] = nn.Linear(self.out_features, config.bottleneck_size)
        self.adapter_up[adapter_name] = up = nn.Linear(config.bottleneck_size, self.out_features)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.adapter_act[adapter_name] = _ACTIVATIONS[config.non_linearity]()
        self.adapter_dropout[adapter_name] = nn.Dropout(config.dropout)
        self.scaling[adapter_name] = config.scaling
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        if self.disable_adapters:
            return base
        result = base
        for name in self.active_adapters:  # several active adapters each read the base output and add up
            if name not in self.adapter_down:  # this layer is not targeted by that adapter
                continue
            h = self._cast_input_dtype(base, self.adapter_down[name].weight.dtype)
            h = self.adapter_up[name](self.adapter_act[name](self.adapter_down[name](self.adapter_dropout[name](h))))
            result = result + (h * self.scaling[name]).to(base.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ConfigError(_NO_MERGE)

    def unmerge(self) -> None:
        """Nothing to undo: a bottleneck adapter is never merged."""


class BottleneckModel(BaseTuner):
    """The PEFT tuner for bottleneck adapters: wraps `target_modules` in BottleneckLayers, one entry per adapter."""

    prefix = "adapter_"
    tuner_layer_cls = BottleneckLayer

    def _prepare_model(self, peft_config: BottleneckConfig, model: nn.Module) -> None:
        # Raise our error, listing the usable names, before PEFT wraps anything.
        names = _projection_names(model)
        if not any(self._check_target_module_exists(peft_config, key) for key in names):
            suffixes = sorted({key.rpartition(".")[2] for key in names})
            raise ConfigError(f"target_modules={peft_config.target_modules}: no such Linear/Conv1D module in "
                              f"{type(model).__name__}; its projections end in {suffixes}")

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key,
                            parameter_name=None) -> None:
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config)
            return
        if not isinstance(target, (nn.Linear, Conv1D)):
            raise ConfigError(f"target_modules matched {current_key}, a {type(target).__name__}: bottleneck "
                              "adapters wrap only Linear and Conv1D projections")
        layer = BottleneckLayer(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)  # a further adapter trains only once set_adapter selects it
        self._replace_module(parent, target_name, layer, target)

    def _check_merge_allowed(self):
        raise ConfigError(_NO_MERGE)

    def add_adapter(self, adapter_name: str, config: BottleneckConfig) -> None:
        """Add another named adapter; the active adapter stays as it is."""
        if adapter_name in self.peft_config:
            raise ConfigError(f"adapter {adapter_name!r} exists already on this model; give the new one another name")
        self.peft_config[adapter_name] = config
        try:
            self.inject_adapter(self.model, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            raise

    @contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block, like PEFT's `PeftModel.disable_adapter`."""
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()


def add_bottleneck(model: nn.Module, config: BottleneckConfig, adapter_name: str = "default") -> BottleneckModel:
    """Add a named bottleneck adapter to `model` (a base or a BottleneckModel); only adapter weights train."""
    if isinstance(model, PeftModel):
        raise ConfigError("bottleneck adapters cannot join PEFT adapters on one model: add them to a fresh base")
    config = replace(config, base_model_name_or_path=config.base_model_name_or_path or base_name(model),
                     base_model_fingerprint=base_fingerprint(model))
    if isinstance(model, BottleneckModel):
        model.add_adapter(adapter_name, config)
        return model
    return BottleneckModel(model, config, adapter_name)


def save_bottleneck(model: BottleneckModel, directory, adapter_name: str = "default") -> Path:
    """Write one adapter as adapter_config.json + adapter_model.safetensors (its weights only, PEFT's names)."""
    if adapter_name not in model.peft_config:
        raise ConfigError(f"no adapter {adapter_name!r} on this model; it has {sorted(model.peft_config)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: p.detach().cpu().contiguous() for key, p in _adapter_tensors(model, adapter_name).items()}
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    model.peft_config[adapter_name].save_pretrained(str(directory))
    return directory


def load_bottleneck(model: nn.Module, directory, adapter_name: str = "default") -> BottleneckModel:
    """Add the adapter saved in `directory` to `model` under `adapter_name`, frozen as PEFT loads adapters."""
    directory = Path(directory)
    require_safetensors(directory)
    config = BottleneckConfig.from_pretrained(directory)
    check_base(directory, config.base_model_name_or_path, config.base_model_fingerprint, model)
    config.inference_mode = True
    model = add_bottleneck(model, config, adapter_name)
    saved, live = load_file(directory / WEIGHTS_NAME), _adapter_tensors(model, adapter_name)
    if saved.keys() != live.keys() or any(saved[key].shape != p.shape for key, p in live.items()):
        missing, extra = sorted(live.keys() - saved.keys()), sorted(saved.keys() - live.keys())
        raise CheckpointError(f"{directory / WEIGHTS_NAME} does not match its {CONFIG_NAME} (missing "
                              f"{missing[:2]}, unexpected {extra[:2]}, or other shapes); save the adapter again")
    with torch.no_grad():
        for key, p in live.items():
            p.copy_(saved[key])
    return model


def _adapter_tensors(model: BottleneckModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """One adapter's parameters keyed as PEFT saves them: the adapter name left out, PeftModel's path in front."""
    tensors = {}
    for path, layer in model.model.named_modules():
        if isinstance(layer, BottleneckLayer) and adapter_name in layer.adapter_down:
            for attr in layer.adapter_layer_names:
                for name, p in getattr(layer, attr)[adapter_name].named_parameters():
                    tensors[f"{PEFT_KEY_PREFIX}{path}.{attr}.{name}"] = p
    return tensors


def _projection_names(model: nn.Module) -> list[str]:
    """Names of the modules a bottleneck can wrap: Linear/Conv1D, or layers already wrapped, not their insides."""
    wrapped = [name for name, m in model.named_modules() if isinstance(m, BottleneckLayer)]
    return wrapped + [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))
                      and not any(name.startswith(w + ".") for w in wrapped)]
