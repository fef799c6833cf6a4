"""Config checking and building: each stage's nodes against their schemas (lifecycle.schemas) or callables,
in seconds, before any heavy import or model load; `build` instantiates `_target_` nodes."""
from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lifecycle.errors import ConfigError
from lifecycle.schemas import (
    ContaminationSchema, DataModuleSchema, DataSettingsSchema, DecontamSchema, EarlyStoppingSchema,
    EvalDataSchema, EvalTasksSchema, FinetuneSettingsSchema, GateSchema, InstructDataSchema, InstructSchema,
    OptimizerSchema, PartitionSchema, PrecisionSchema, SamplesSchema, SchedulerSchema, TargetSchema,
    TokenizerSchema, TrainSchema, TrainerSchema,
)
from lifecycle.schemas import BenchSchema, OptimizeSourceSchema
from lifecycle.schemas import UsageSettingsSchema
from lifecycle.schemas import DeploySchema, ServeCheckSchema, ServeSettingsSchema
from lifecycle.schemas import (
    BillingSchema, BusinessSchema, CompareFiltersSchema, CompareSettingsSchema, CostRunsSchema, HardwareSchema,
    ProjectionSchema, ServingSchema,
)
from lifecycle.schemas import MonitorServerSchema, MonitorSettingsSchema, PrometheusSourceSchema, WebhookSchema


# What each stage reads, and the schema of each node (None: a `_target_` node checked against its callable;
# TARGETS: a non-empty mapping whose every entry is such a node; ROOT: the schema of the stage's top-level settings).
TARGETS, OPTIONAL_TARGETS, ROOT = "targets", "optional targets", "."
STAGE_NODES: dict[str, dict[str, Any]] = {
    "data": {ROOT: DataSettingsSchema, "sources": TARGETS, "steps": OPTIONAL_TARGETS, "dedup": None,
             "tokenizer": TokenizerSchema, "decontam": DecontamSchema, "instruct": InstructSchema, "partition": PartitionSchema,
             "logger": None},
    # Order matters: a node is checked before the nodes that interpolate it (scheduler reads trainer.max_steps).
    "pretrain": {"trainer": TrainerSchema, "data": DataModuleSchema, "model": None, "strategy": None,
                 "precision": PrecisionSchema, "optimizer": OptimizerSchema, "scheduler": SchedulerSchema,
                 "logger": None, "train": TrainSchema, "samples": SamplesSchema},
    "finetune": {ROOT: FinetuneSettingsSchema, "trainer": TrainerSchema, "data": InstructDataSchema, "base": None,
                 "strategy": None, "precision": PrecisionSchema, "optimizer": OptimizerSchema,
                 "scheduler": SchedulerSchema, "logger": None, "train": TrainSchema,
                 "early_stopping": EarlyStoppingSchema},
    "evaluate": {"target": TargetSchema, "data": EvalDataSchema, "tasks": EvalTasksSchema,
                 "contamination": ContaminationSchema, "samples": SamplesSchema, "gate": GateSchema, "logger": None},
    "pipeline": {"logger": None},
    "optimize": {"source": OptimizeSourceSchema, "passes": TARGETS, "bench": BenchSchema, "trainer": TrainerSchema,
                 "data": DataModuleSchema, "precision": PrecisionSchema, "optimizer": OptimizerSchema,
                 "scheduler": SchedulerSchema, "logger": None, "train": TrainSchema},
    "cost": {"runs": CostRunsSchema, "serving": ServingSchema, "hardware": HardwareSchema,
             "measured_on": HardwareSchema, "business": BusinessSchema, "projection": ProjectionSchema,
             "billing": BillingSchema, "logger": None},
    "compare": {ROOT: CompareSettingsSchema, "filters": CompareFiltersSchema, "logger": None},
    "usage": {ROOT: UsageSettingsSchema, "logger": None},
    # Dotted keys name nested nodes: the profile's engine (or vLLM command) is checked against its callable.
    "serve": {ROOT: ServeSettingsSchema, "deploy": DeploySchema, "check": ServeCheckSchema, "rest": None, "grpc": None, "deploy.engine": None,
              "deploy.vllm": None, "logger": None},
    # Alert rules are checked by lifecycle.monitor.rules.load (each under its own name); drift by its module.
    "monitor": {ROOT: MonitorSettingsSchema, "server": MonitorServerSchema, "prometheus": PrometheusSourceSchema,
                "webhook": WebhookSchema, "alerts": None, "drift": None, "retrain": None, "registry": None,
                "logger": None},
}
SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)$", re.IGNORECASE)


def validate(cfg: DictConfig, stage: str) -> None:
    """Raise ConfigError naming the first bad key; imports nothing heavy."""
    for k, v in _walk(OmegaConf.to_container(cfg, resolve=False)):
        if SECRET_KEY.search(k) and v not in (None, "", "???"):
            raise ConfigError(f"{k}: secrets do not belong in the config (it is written to disk and to W&B); "
                              "pass them through the environment, e.g. WANDB_API_KEY")
    for key, schema in STAGE_NODES[stage].items():
        if key == ROOT:
            _check_schema("settings", schema, {f: cfg[f] for f in schema.__dataclass_fields__})
            continue
        if schema in (TARGETS, OPTIONAL_TARGETS):
            if not cfg[key] and schema == TARGETS:
                raise ConfigError(f"{key}: none selected; pick at least one, e.g. {key[:-1]}=[stdlib]")
            for name in cfg[key]:
                _check_node(f"{key}.{name}", cfg[key][name], None)
            continue
        _check_node(key, OmegaConf.select(cfg, key), schema)


def _check_node(key: str, node: Any, schema: Optional[type]) -> None:
    if node is None:
        return
    try:
        missing = sorted(f"{key}.{k}" for k in OmegaConf.missing_keys(node))
        values = OmegaConf.to_container(node, resolve=True) if not missing else None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', None) or key}: {str(e).splitlines()[0]}") from None
    if missing:
        raise ConfigError(f"{missing[0]} is required (it is '???'): set it on the command line, "
                          f"e.g. {missing[0]}=<value>")
    if schema is not None:
        _check_schema(key, schema, values)
    elif isinstance(values, dict) and isinstance(values.get("_target_"), str):
        _check_target(key, values)


def _check_schema(key: str, schema: type, values: Any) -> None:
    try:
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        bad = getattr(e, "full_key", "") or ""
        name = f"{key}.{bad}" if bad else key
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{name}: {msg}") from None


def _check_target(key: str, values: dict) -> None:
    """Every key of a `_target_` node must be a keyword of the callable it names."""
    target = values["_target_"]
    if not target.startswith("lifecycle."):
        return  # third-party callables are checked when instantiated (importing them here is slow)
    module_name, _, attr = target.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise ConfigError(f"{key}._target_: no callable named {target}") from None
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for k in values:
        if not k.startswith("_") and k not in params:
            valid = ", ".join(p for p in params if not p.startswith("_"))
            raise ConfigError(f"{key}.{k}: unknown key for {target}; valid keys: {valid}")


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.") if isinstance(v, (dict, list)) else [(f"{prefix}{k}", v)]
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{prefix}{i}.")


def resolved(cfg: DictConfig) -> dict:
    """The resolved config as plain data, with secret-looking values masked."""
    data = OmegaConf.to_container(cfg, resolve=True)
    return _mask(data)


def _mask(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: ("***" if SECRET_KEY.search(str(k)) and v else _mask(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_mask(v) for v in node]
    return node


def build(node: DictConfig, **runtime: Any) -> Any:
    """hydra.utils.instantiate, letting our own errors through unwrapped (Hydra wraps every exception)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from lifecycle.errors import LifecycleError

    try:
        return instantiate(node, **runtime)
    except InstantiationException as e:
        if isinstance(e.__cause__, LifecycleError):
            raise e.__cause__ from None
        raise
