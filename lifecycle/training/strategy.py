"""Fine-tuning strategies: which parameters train and how the result is saved. The training loop never changes.

Each `conf/strategy/*.yaml` builds one of these through its `_target_`. A strategy is called on the base model
(returning the model to train) and later saves what it trained: the full model, or an adapter directory plus,
where the method allows, a merged plain model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lifecycle.errors import ConfigError


class Full:
    """Train every parameter; the result is a plain transformers model directory."""

    def __init__(self, lr: float):
        self.lr, self.adapter_name = lr, None

    def __call__(self, model: torch.nn.Module) -> torch.nn.Module:
        model.requires_grad_(True)
        return model

    def save(self, model, run_dir: Path) -> dict[str, Path]:
        model.save_pretrained(run_dir / "model", safe_serialization=True)
        return {"model": run_dir / "model"}


class Peft:
    """A PEFT method: base frozen, adapter weights trained and saved in PEFT's directory format."""

    def __init__(self, config, adapter_name: str, lr: float, mergeable: bool, model_types: tuple[str, ...] = ()):
        self.config, self.adapter_name, self.lr = config, adapter_name, lr
        self.mergeable, self.model_types = mergeable, model_types

    def __call__(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import get_peft_model

        kind = type(self.config).__name__.removesuffix("Config")
        if self.model_types and model.config.model_type not in self.model_types:
            raise ConfigError(f"strategy {kind} does not support model type {model.config.model_type!r}; it works "
                              f"with {', '.join(self.model_types)}. Pick another strategy (lora, ia3, adapter, ...)")
        _check_targets(model, getattr(self.config, "target_modules", None), kind)
        return get_peft_model(model, self.config, adapter_name=self.adapter_name)

    def save(self, model, run_dir: Path) -> dict[str, Path]:
        out = {"adapter": run_dir / "adapter"}
        model.save_pretrained(out["adapter"], selected_adapters=[self.adapter_name])
        if self.mergeable:
            merged = model.merge_and_unload()
            merged.save_pretrained(run_dir / "merged", safe_serialization=True)
            out["merged"] = run_dir / "merged"
        return out


class PeftFrom(Peft):
    """Go on training an existing PEFT adapter (the production one, say) rather than starting a fresh one."""

    def __init__(self, path: str | None, adapter_name: str, lr: float):
        super().__init__(None, adapter_name, lr, mergeable=False)
        self.path = path

    def __call__(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import PeftModel

        from lifecycle.models.adapters import read_config

        if not self.path:
            raise ConfigError("strategy=lora_continue: set strategy.path to the adapter directory to continue")
        kind = read_config(Path(self.path)).get("peft_type")
        if kind not in ("LORA", "IA3"):
            raise ConfigError(f"strategy.path={self.path}: a {kind} adapter; lora_continue continues LoRA or IA3 "
                              "adapters (train a new one with strategy=<its kind> instead)")
        self.mergeable = True
        return PeftModel.from_pretrained(model, self.path, adapter_name=self.adapter_name, is_trainable=True)


class Bottleneck:
    """Houlsby bottleneck adapters after the attention and MLP output projections (lifecycle.training.bottleneck)."""

    def __init__(self, bottleneck_size: int, non_linearity: str, dropout: float, target_modules: list[str],
                 scaling: float, adapter_name: str, lr: float):
        self.settings = dict(bottleneck_size=bottleneck_size, non_linearity=non_linearity, dropout=dropout,
                             target_modules=list(target_modules), scaling=scaling)
        self.adapter_name, self.lr, self.mergeable = adapter_name, lr, False

    def __call__(self, model: torch.nn.Module) -> torch.nn.Module:
        from lifecycle.training.bottleneck import BottleneckConfig, add_bottleneck

        config = BottleneckConfig(**self.settings, base_model_name_or_path=model.config.name_or_path or None)
        return add_bottleneck(model, config, self.adapter_name)

    def save(self, model, run_dir: Path) -> dict[str, Path]:
        from lifecycle.training.bottleneck import save_bottleneck

        save_bottleneck(model, run_dir / "adapter", self.adapter_name)
        return {"adapter": run_dir / "adapter"}


def _check_targets(model: torch.nn.Module, targets, kind: str) -> None:
    """Fail before training, naming the valid choices, when target modules match nothing in the model."""
    if targets is None or isinstance(targets, str):
        return
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_projection(m)}
    missing = sorted(set(targets) - names)
    if missing:
        raise ConfigError(f"strategy {kind}: target modules {missing} do not exist in {type(model).__name__}; "
                          f"valid: {sorted(names)} (or all-linear)")


def _is_projection(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def full(lr: float) -> Full:
    return Full(lr)


def lora(r: int, alpha: int, dropout: float, target_modules, adapter_name: str, lr: float) -> Peft:
    from peft import LoraConfig

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                        target_modules=_targets(target_modules))
    return Peft(config, adapter_name, lr, mergeable=True)


def lora_continue(path: str | None, adapter_name: str, lr: float) -> PeftFrom:
    return PeftFrom(path, adapter_name, lr)


def ia3(target_modules, feedforward_modules, adapter_name: str, lr: float) -> Peft:
    from peft import IA3Config

    config = IA3Config(task_type="CAUSAL_LM", target_modules=_targets(target_modules),
                       feedforward_modules=_targets(feedforward_modules))
    return Peft(config, adapter_name, lr, mergeable=True)


def ptuning(num_virtual_tokens: int, encoder_reparameterization_type: str, encoder_hidden_size: int,
            adapter_name: str, lr: float) -> Peft:
    from peft import PromptEncoderConfig

    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                 encoder_reparameterization_type=encoder_reparameterization_type,
                                 encoder_hidden_size=encoder_hidden_size)
    return Peft(config, adapter_name, lr, mergeable=False)


def prompt_tuning(num_virtual_tokens: int, adapter_name: str, lr: float) -> Peft:
    from peft import PromptTuningConfig

    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    return Peft(config, adapter_name, lr, mergeable=False)


def prefix_tuning(num_virtual_tokens: int, adapter_name: str, lr: float) -> Peft:
    from peft import PrefixTuningConfig

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    return Peft(config, adapter_name, lr, mergeable=False)


def llama_adapter(adapter_len: int, adapter_layers: int, adapter_name: str, lr: float) -> Peft:
    from peft import AdaptionPromptConfig
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

    config = AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=adapter_len, adapter_layers=adapter_layers)
    return Peft(config, adapter_name, lr, mergeable=False, model_types=tuple(TRANSFORMERS_MODEL_CONFIG))


def adapter(bottleneck_size: int, non_linearity: str, dropout: float, target_modules: list[str], scaling: float,
            adapter_name: str, lr: float) -> Bottleneck:
    return Bottleneck(bottleneck_size, non_linearity, dropout, target_modules, scaling, adapter_name, lr)


def _targets(value):
    """`all-linear` stays a string for PEFT; lists become plain lists (Hydra passes ListConfig)."""
    return value if isinstance(value, str) or value is None else list(value)
