"""Every primary config x every experiment composes, validates and instantiates; every group option composes."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lifecycle import CONF_DIR, STAGES
from lifecycle.config import validate

from conftest import make_cfg

CONF = Path(CONF_DIR)
EXPERIMENTS = [None] + sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
NEEDS_VALUE = {"model": {"hf_pretrained": ["model.name_or_path=/some/model"]},
               "source": {"files": ["sources.files.path=/some/docs"], "jsonl": ["sources.jsonl.path=/some/x.jsonl"],
                          "hf_dataset": ["sources.hf_dataset.path=/some/dataset"]},
               "tokenizer": {"hf_pretrained": ["tokenizer.name_or_path=/some/tok"]}}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("stage", STAGES)
def test_primary_x_experiment_composes_and_validates(stage, experiment, tmp_path):
    overrides = [f"experiment={experiment}"] if experiment else []
    cfg = make_cfg(stage, tmp_path / stage / "run", overrides)
    validate(cfg, stage)
    assert cfg.name == (experiment or "default")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_pretrain_groups_instantiate(experiment, tmp_path):
    cfg = make_cfg("pretrain", tmp_path / "pretrain" / "run", [f"experiment={experiment}"] if experiment else [])
    model = instantiate(cfg.model, vocab_size=300, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = instantiate(cfg.strategy)(model)
    assert all(p.requires_grad for p in model.parameters())
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optimizer.lr * scheduler.lr_lambdas[0](0))
    datamodule = instantiate(cfg.data)
    assert datamodule.seq_len == cfg.data.seq_len
    trainer = instantiate(cfg.trainer, precision="32-true", logger=False)
    assert trainer.max_steps == cfg.trainer.max_steps


PRETRAIN_ONLY = {"data": ["packed"], "strategy": ["full"]}  # pretraining reads token shards and trains everything


@pytest.mark.parametrize("group", ["model", "strategy", "precision", "optimizer", "scheduler", "trainer", "logger",
                                   "data"])
def test_every_pretrain_group_option_composes(group, tmp_path):
    for option in PRETRAIN_ONLY.get(group, options(group)):
        extra = NEEDS_VALUE.get(group, {}).get(option, [])
        cfg = make_cfg("pretrain", tmp_path / "pretrain" / option, [f"{group}={option}", *extra])
        validate(cfg, "pretrain")


@pytest.mark.parametrize("option", options("strategy"))
def test_every_strategy_composes_and_builds_for_finetune(option, tmp_path):
    cfg = make_cfg("finetune", tmp_path / "finetune" / option, [f"strategy={option}"])
    validate(cfg, "finetune")
    strategy = instantiate(cfg.strategy)
    assert cfg.optimizer.lr == strategy.lr > 0


@pytest.mark.parametrize("group", ["source", "step", "dedup", "tokenizer"])
def test_every_data_group_option_composes(group, tmp_path):
    for option in options(group):
        extra = NEEDS_VALUE.get(group, {}).get(option, [])
        choice = f"{group}=[{option}]" if group in ("source", "step") else f"{group}={option}"
        validate(make_cfg("data", tmp_path / "data" / option, [choice, *extra]), "data")


def test_data_steps_instantiate_in_order(tmp_path):
    cfg = make_cfg("data", tmp_path / "data" / "r")
    steps = [instantiate(node) for node in cfg.steps.values()]
    assert [s.name for s in steps] == list(cfg.steps) == ["clean", "code", "gopher", "blocklist", "pii"]
    sources = {name: instantiate(node, name=name) for name, node in cfg.sources.items()}
    assert list(sources) == ["stdlib"]


def test_slurm_launcher_composes():
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("pretrain", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.nodes == 2 and launcher.tasks_per_node == 2


def test_every_yaml_opens_with_a_comment():
    for path in CONF.rglob("*.yaml"):
        first = path.read_text().lstrip().splitlines()[0]
        assert first.startswith("#"), f"{path} should open with a comment saying what it is"


@pytest.mark.parametrize("sweep", sorted((CONF.parent / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_sweep_files_name_real_overrides(sweep, tmp_path):
    import yaml

    spec = yaml.safe_load(sweep.read_text())
    stage = spec["command"][1]
    assert spec["command"][0] == "lifecycle" and stage in STAGES
    for key, values in spec["parameters"].items():
        value = values.get("value", (values.get("values") or [values.get("min")])[0])
        validate(make_cfg(stage, tmp_path / stage / "run", [f"{key}={value}"]), stage)


@pytest.mark.parametrize("variant", options("optimize"))
def test_every_optimize_variant_composes_and_builds_its_passes(variant, tmp_path):
    cfg = make_cfg("optimize", tmp_path / "optimize" / variant, [f"optimize={variant}"])
    validate(cfg, "optimize")
    passes = [instantiate(node) for node in cfg.passes.values()]
    assert passes and all(callable(p.apply) for p in passes)


@pytest.mark.parametrize("profile", options("deploy"))
def test_every_deploy_profile_composes_and_validates(profile, tmp_path):
    cfg = make_cfg("serve", tmp_path / "serve" / "run", [f"deploy={profile}"])
    validate(cfg, "serve")
    assert set(cfg.deploy.frontends) <= {"rest", "grpc"} and (cfg.deploy.vllm is None) == bool(cfg.deploy.frontends)
