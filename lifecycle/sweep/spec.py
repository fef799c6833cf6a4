"""A sweep file read into one Spec: our Optuna form (conf/hparams_search/*.yaml) or a W&B sweep file (sweeps/*.yaml),
checked against the stage's composed config before any trial runs."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lifecycle import CONF_DIR, STAGES
from lifecycle.errors import ConfigError

WANDB_METHODS = {"grid": "optuna.samplers.GridSampler", "random": "optuna.samplers.RandomSampler",
                 "bayes": "optuna.samplers.TPESampler"}
WANDB_DISTRIBUTIONS = ("constant", "categorical", "uniform", "int_uniform", "log_uniform_values", "log_uniform",
                       "q_uniform", "q_log_uniform_values")
OPTUNA_TYPES = ("float", "int", "categorical")
GOALS = {"minimize": "minimize", "maximize": "maximize"}


@dataclass
class Param:
    """One searched key: float/int in [low, high] (log scale, step) or categorical choices."""
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None
    quantum: float | None = None  # q_log_uniform_values: the sampled value rounded to a multiple of this


@dataclass
class Spec:
    name: str
    stage: str
    metric: str
    direction: str
    n_trials: int | None
    params: dict[str, Param]
    fixed: list[str] = field(default_factory=list)
    sampler: dict = field(default_factory=dict)  # a `_target_` node for an optuna sampler
    pruner: dict | None = None
    wandb: dict | None = None  # the W&B definition, when the file is one


def locate(arg: str) -> Path:
    """A sweep file by path, or by name under conf/hparams_search/ or sweeps/."""
    root = Path(CONF_DIR)
    for path in (Path(arg), root / "hparams_search" / f"{arg}.yaml", root.parent / "sweeps" / f"{arg}.yaml"):
        if path.is_file():
            return path
    raise ConfigError(f"sweep file {arg!r} not found (a path, or a name in conf/hparams_search/ or sweeps/)")


def load(path: Path, n_trials: int | None = None) -> Spec:
    """Read either format into a Spec; `n_trials` (the command line) wins over the file."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    spec = from_wandb(raw, path.stem) if "method" in raw else from_optuna(raw, path.stem)
    if n_trials is not None:
        spec.n_trials = n_trials
    if spec.sampler["_target_"] == WANDB_METHODS["grid"]:
        size = math.prod(len(p.choices) for p in spec.params.values())
        spec.n_trials = min(spec.n_trials or size, size)
    if not spec.n_trials or spec.n_trials < 1:
        raise ConfigError(f"{path}: how many trials? set n_trials (run_cap in a W&B file) or pass --trials N")
    return spec


def from_optuna(raw: dict, name: str) -> Spec:
    """conf/hparams_search/*.yaml: stage, objective, n_trials, sampler, pruner, params, fixed."""
    unknown = set(raw) - {"stage", "objective", "n_trials", "sampler", "pruner", "params", "fixed"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown sweep field; valid: stage, objective, n_trials, sampler, "
                          "pruner, params, fixed")
    objective = _need(raw, "objective", dict)
    params = {k: _optuna_param(k, v) for k, v in _need(raw, "params", dict).items()}
    return Spec(name, _need(raw, "stage", str), _need(objective, "metric", str, "objective."),
                _direction(_need(objective, "direction", str, "objective."), "objective.direction"),
                raw.get("n_trials"), params, [str(x) for x in raw.get("fixed") or []],
                dict(raw.get("sampler") or {"_target_": WANDB_METHODS["bayes"]}), raw.get("pruner"))


def _optuna_param(key: str, v: Any) -> Param:
    if not isinstance(v, dict) or v.get("type") not in OPTUNA_TYPES:
        raise ConfigError(f"params.{key}.type: must be one of {', '.join(OPTUNA_TYPES)}")
    if v["type"] == "categorical":
        return Param("categorical", choices=list(_need(v, "choices", list, f"params.{key}.")))
    extra = set(v) - {"type", "low", "high", "log", "step"}
    if extra:
        raise ConfigError(f"params.{key}.{sorted(extra)[0]}: unknown; a {v['type']} takes low, high, log, step")
    return Param(v["type"], v.get("low"), v.get("high"), bool(v.get("log", False)), v.get("step"))


def from_wandb(raw: dict, name: str) -> Spec:
    """A W&B sweep file: method, metric, parameters, command ([lifecycle, <stage>, ...]), run_cap."""
    method = raw["method"]
    if method not in WANDB_METHODS:
        raise ConfigError(f"method: {method!r} is not a sweep method; choose one of {', '.join(WANDB_METHODS)}")
    command = raw.get("command") or []
    if len(command) < 2 or command[0] != "lifecycle":
        raise ConfigError("command: must start with [lifecycle, <stage>, ...] so each trial is a stage run")
    metric = _need(raw, "metric", dict)
    fixed, params = [], {}
    for key, v in _need(raw, "parameters", dict).items():
        param = _wandb_param(key, v if isinstance(v, dict) else {})
        if param.kind == "fixed":
            fixed.append(f"{key}={text(param.choices[0])}")
        else:
            params[key] = param
    sampler: dict = {"_target_": WANDB_METHODS[method]}
    if method == "grid":
        if any(p.kind != "categorical" for p in params.values()):
            raise ConfigError("method: grid needs `values` (or `value`) for every parameter")
        sampler["search_space"] = {k: p.choices for k, p in params.items()}
    else:
        sampler["seed"] = 0
    return Spec(name, str(command[1]), _need(metric, "name", str, "metric."),
                _direction(metric.get("goal", "minimize"), "metric.goal"), raw.get("run_cap"), params, fixed,
                sampler, _wandb_pruner(raw.get("early_terminate")), raw)


def _wandb_param(key: str, v: dict) -> Param:
    where = f"parameters.{key}"
    dist = v.get("distribution") or ("constant" if "value" in v else "categorical" if "values" in v else
                                     "int_uniform" if all(isinstance(v.get(b), int) for b in ("min", "max"))
                                     else "uniform")
    if dist not in WANDB_DISTRIBUTIONS:
        raise ConfigError(f"{where}.distribution: {dist!r} is not supported; choose one of "
                          f"{', '.join(WANDB_DISTRIBUTIONS)}")
    if dist == "constant":
        return Param("fixed", choices=[v.get("value")])
    if dist == "categorical":
        return Param("categorical", choices=list(_need(v, "values", list, f"{where}.")))
    low, high = _need(v, "min", (int, float), f"{where}."), _need(v, "max", (int, float), f"{where}.")
    if dist == "log_uniform":  # W&B: min and max are natural-log exponents
        return Param("float", math.exp(low), math.exp(high), log=True)
    if dist == "int_uniform":
        return Param("int", int(low), int(high))
    q = v.get("q", 1.0) if dist.startswith("q_") else None
    if dist == "q_log_uniform_values":
        return Param("float", low, high, log=True, quantum=q)
    return Param("float", low, high, log=dist == "log_uniform_values", step=q)


def _wandb_pruner(early: dict | None) -> dict | None:
    if not early:
        return None
    if early.get("type") != "hyperband":
        raise ConfigError(f"early_terminate.type: {early.get('type')!r} is not supported; use hyperband")
    return {"_target_": "optuna.pruners.HyperbandPruner", "min_resource": early.get("min_iter", 1),
            "reduction_factor": early.get("eta", 3)}


def check(spec: Spec, overrides: list[str]):
    """Compose the stage's config with the fixed overrides and both ends of the space; name any unknown key."""
    from lifecycle.config import validate

    if spec.stage not in STAGES or spec.stage == "pipeline":
        raise ConfigError(f"stage: {spec.stage!r} is not a stage; choose one of {', '.join(STAGES)}")
    base = [*spec.fixed, *(o for o in overrides if not o.lstrip("+").startswith("hydra."))]
    cfg = compose(spec.stage, base)
    groups = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
    for key in spec.params:
        if key.lstrip("+") not in groups and _select(cfg, key.lstrip("+")) is _ABSENT:
            close = difflib.get_close_matches(key, sorted(_keys(cfg)) + sorted(groups), n=3, cutoff=0.5)
            raise ConfigError(f"parameters.{key}: the {spec.stage} config has no such key; closest: "
                              f"{', '.join(close) or 'none'}")
    for corner in (0, -1):
        validate(compose(spec.stage, [*base, *(f"{k}={text(v)}" for k, v in corner_point(spec, corner).items())]),
                 spec.stage)
    return cfg


def corner_point(spec: Spec, end: int) -> dict:
    """The lowest (end=0) or highest (end=-1) value of every parameter."""
    return {k: p.choices[end] if p.kind == "categorical" else (p.low, p.high)[end] for k, p in spec.params.items()}


def compose(stage: str, overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            return hydra_compose(stage, overrides=list(overrides))
    except HydraException as e:
        raise ConfigError(f"{stage}: {str(e).splitlines()[0]}") from None


_ABSENT = object()


def _select(cfg, key: str):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False, throw_on_resolution_failure=False)


def _keys(cfg) -> set[str]:
    from omegaconf import OmegaConf

    def walk(node, prefix):
        for k, v in node.items():
            yield f"{prefix}{k}"
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
    return set(walk(OmegaConf.to_container(cfg, resolve=False), ""))


def _need(node: dict, key: str, kind, prefix: str = "") -> Any:
    if not isinstance(node.get(key), kind):
        raise ConfigError(f"{prefix}{key}: required ({getattr(kind, '__name__', 'a number')})")
    return node[key]


def _direction(goal: str, where: str) -> str:
    if goal not in GOALS:
        raise ConfigError(f"{where}: {goal!r}; choose minimize or maximize")
    return GOALS[goal]


def text(value: Any) -> str:
    """A value as a Hydra override string."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, str) and any(c in value for c in " ,=[]{}()'\"\\:"):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)
