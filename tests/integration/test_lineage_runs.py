"""A tiny pretrain run with logger=wandb (offline) uses the data run's dataset and tokenizer and logs its model."""
from __future__ import annotations

import json

import pytest

from lifecycle.pretrain.stage import run

from conftest import make_cfg
from wandb_records import artifacts

pytestmark = pytest.mark.integration


def test_pretrain_links_dataset_and_tokenizer_to_its_model(data_dir, tmp_path):
    run_dir = tmp_path / "pretrain" / "w"
    run(make_cfg("pretrain", run_dir, ["experiment=smoke", "logger=wandb", f"data.dir={data_dir}",
                                       "trainer.max_steps=2", "trainer.val_check_interval=2", "data.val_batches=1",
                                       "samples.max_new_tokens=2", "samples.prompts=[x]"]))
    records = {(a.name, a.type, a.use_after_commit): a for a in artifacts(run_dir)}
    used = {(name, kind) for name, kind, use in records if use}
    assert used == {("dataset-clean", "dataset"), ("tokenizer-tokenizer", "tokenizer")}  # data ran without W&B
    tokenizer = records[("tokenizer-tokenizer", "tokenizer", True)]
    assert {e.ref for e in tokenizer.manifest.contents} >= {(data_dir / "tokenizer" / "tokenizer.json").as_uri()}
    model = records[("model-smoke", "model", False)]
    assert "model.safetensors" in {e.path for e in model.manifest.contents}
    assert json.loads((run_dir / "artifacts.json").read_text()) == [
        {"name": "model-smoke", "type": "model", "path": str((run_dir / "model").resolve())}]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["wandb_run_id"]
