"""W&B lineage offline: a consumer's input artifact has its producer's name, type and digest, so they link on sync."""
from __future__ import annotations

import json

from lifecycle import tracking
from wandb_records import artifacts


class WandbLogger:
    """What link_lineage reads of Lightning's WandbLogger (its run), without importing Lightning (~10 s)."""

    lifecycle_log_model = True

    def __init__(self, save_dir, name):
        import wandb

        self.experiment = wandb.init(project="lineage-test", dir=str(save_dir), name=name, mode="offline")


def logger(save_dir, name):
    return WandbLogger(save_dir, name)


def test_consumer_uses_the_producers_artifact_version(tmp_path):
    producer = tmp_path / "pretrain" / "p"
    (producer / "model").mkdir(parents=True)
    (producer / "model" / "config.json").write_text('{"a": 1}')
    (producer / "model" / "weights.bin").write_bytes(b"\0" * 100)
    first = logger(producer, "pretrain")
    tracking.link_lineage(first, producer, {}, {"model": producer / "model"}, "exp", {"val/loss": 1.0})
    tracking.finish(first)

    consumer = tmp_path / "finetune" / "c"
    consumer.mkdir(parents=True)
    (consumer / "adapter").mkdir()
    (consumer / "adapter" / "adapter.bin").write_bytes(b"\1" * 10)
    second = logger(consumer, "finetune")
    tracking.link_lineage(second, consumer, {"model": producer / "model", "dataset": tmp_path / "absent"},
                          {"adapter": consumer / "adapter"}, "exp")
    tracking.finish(second)

    [made] = artifacts(producer)
    assert (made.name, made.type, made.use_after_commit) == ("model-exp", "model", False)
    used, logged = artifacts(consumer)
    assert (used.name, used.type, used.use_after_commit) == ("model-exp", "model", True)
    assert used.digest == made.digest  # the same version: W&B draws model -> finetune run -> adapter
    assert all(e.ref.startswith("file://") for e in used.manifest.contents)
    assert (logged.name, logged.type, logged.use_after_commit) == ("adapter-exp", "adapter", False)
    assert json.loads((consumer / "artifacts.json").read_text())[0]["name"] == "adapter-exp"
