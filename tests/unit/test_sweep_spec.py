"""Sweep files (our Optuna form and W&B's) read into one spec; bad keys, methods and distributions fail early."""
from __future__ import annotations

import math

import pytest
import yaml

from lifecycle.errors import ConfigError
from lifecycle.sweep import online, spec as specs, trial as trials


def write(tmp_path, data: dict, name: str = "s"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


WANDB = {"program": "lifecycle", "command": ["lifecycle", "pretrain", "${args_no_hyphens}"], "method": "bayes",
         "metric": {"name": "val/loss", "goal": "minimize"}, "run_cap": 4,
         "parameters": {"optimizer.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
                        "optimizer.weight_decay": {"distribution": "q_uniform", "min": 0.0, "max": 0.2, "q": 0.05},
                        "scheduler.warmup_steps": {"distribution": "int_uniform", "min": 2, "max": 9},
                        "model.hidden_size": {"values": [32, 64]}, "trainer.max_steps": {"value": 7},
                        "optimizer.eps": {"distribution": "log_uniform", "min": -20, "max": -10}}}


def test_wandb_distributions_map_onto_optuna(tmp_path):
    spec = specs.load(write(tmp_path, WANDB))
    assert (spec.stage, spec.metric, spec.direction, spec.n_trials) == ("pretrain", "val/loss", "minimize", 4)
    assert spec.fixed == ["trainer.max_steps=7"] and spec.sampler["_target_"].endswith("TPESampler")
    d = trials.distributions(spec.params)
    assert d["optimizer.lr"].log and (d["optimizer.lr"].low, d["optimizer.lr"].high) == (1e-4, 1e-2)
    assert d["optimizer.weight_decay"].step == 0.05
    assert type(d["scheduler.warmup_steps"]).__name__ == "IntDistribution"
    assert d["model.hidden_size"].choices == (32, 64)
    assert d["optimizer.eps"].low == pytest.approx(math.exp(-20))
    specs.check(spec, [])


def test_grid_counts_its_points_and_needs_values(tmp_path):
    grid = {**WANDB, "method": "grid", "run_cap": None,
            "parameters": {"optimizer.lr": {"values": [1e-3, 2e-3, 3e-3]}, "model.hidden_size": {"values": [32, 64]}}}
    spec = specs.load(write(tmp_path, grid))
    assert spec.n_trials == 6 and spec.sampler["search_space"]["model.hidden_size"] == [32, 64]
    grid["parameters"]["optimizer.lr"] = {"min": 1e-3, "max": 3e-3}
    with pytest.raises(ConfigError, match="grid needs `values`"):
        specs.load(write(tmp_path, grid))


@pytest.mark.parametrize("field, value, message", [
    ("method", "hyperopt", r"method: 'hyperopt' is not a sweep method"),
    ("parameters", {"optimizer.lr": {"distribution": "normal", "mu": 0, "sigma": 1}},
     r"parameters.optimizer.lr.distribution: 'normal' is not supported"),
    ("metric", {"name": "val/loss", "goal": "lowest"}, r"metric.goal: 'lowest'"),
    ("early_terminate", {"type": "envelope"}, r"early_terminate.type"),
])
def test_bad_wandb_fields_are_named(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message):
        specs.load(write(tmp_path, {**WANDB, field: value}))


def test_unknown_key_names_the_closest_before_any_trial(tmp_path):
    bad = {**WANDB, "parameters": {"optimizer.learning_rate": {"values": [1e-3]}}}
    with pytest.raises(ConfigError, match=r"parameters.optimizer.learning_rate: .*closest: optimizer\.\w+"):
        specs.check(specs.load(write(tmp_path, bad)), [])


def test_out_of_range_value_fails_validation(tmp_path):
    bad = {**WANDB, "parameters": {"data.seq_len": {"values": ["long"]}}}
    with pytest.raises(ConfigError, match="seq_len"):
        specs.check(specs.load(write(tmp_path, bad)), [])


def test_optuna_file_in_conf_loads_and_checks():
    spec = specs.load(specs.locate("pretrain_optuna"))
    assert spec.wandb is None and spec.pruner["_target_"].endswith("MedianPruner")
    assert set(spec.params) == {"optimizer.lr", "optimizer.weight_decay", "scheduler.warmup_steps"}
    specs.check(spec, [])
    with pytest.raises(ConfigError, match=r"params.optimizer.lr.type"):
        specs.from_optuna({"stage": "pretrain", "objective": {"metric": "m", "direction": "minimize"},
                           "params": {"optimizer.lr": {"type": "loguniform"}}}, "x")


def test_overrides_render_values_hydra_reads_back():
    params = {"a": specs.Param("float", 1e-4, 1e-2, log=True, quantum=1e-4), "b": specs.Param("categorical",
                                                                                                 choices=["x y", True])}
    a, b = trials.overrides(params, {"a": 0.00123456, "b": "x y"})
    assert a.startswith("a=") and float(a[2:]) == pytest.approx(0.0012) and b == "b='x y'"
    assert trials.overrides(params, {"b": True}) == ["b=true"]


def test_online_definition_keeps_the_file_and_adds_overrides(tmp_path):
    spec = specs.load(write(tmp_path, WANDB))
    d = online.definition(spec, ["data.dir=/d"])
    assert d["command"] == ["lifecycle", "pretrain", "data.dir=/d", "${args_no_hyphens}"]
    assert d["parameters"] == WANDB["parameters"] and d["method"] == "bayes"
    cmd = online.agent_command("abc", 4, "proj", None)
    assert cmd[1:] == ["agent", "--count", "4", "--project", "proj", "abc"]


def test_a_trial_left_running_by_a_killed_sweep_is_run_again(tmp_path):
    from lifecycle.sweep.stage import _done, open_study

    spec = specs.load(write(tmp_path, WANDB))
    study = open_study(spec, tmp_path / "sweep")
    killed = study.ask(trials.distributions(spec.params))  # the sweep died while this trial ran
    study = open_study(spec, tmp_path / "sweep")
    assert study.trials[0].state.name == "FAIL" and _done(study) == 0  # not counted towards n_trials
    assert study.ask(trials.distributions(spec.params)).params == killed.params
    with pytest.raises(ConfigError, match="direction"):
        spec.direction = "maximize"
        open_study(spec, tmp_path / "sweep")
