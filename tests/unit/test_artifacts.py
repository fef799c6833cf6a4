"""Which runs move <output_root>/<stage>/latest, the input later stages read by default."""
import json
import logging
import time

from lifecycle import artifacts


def finish(run_dir, root, promote=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    artifacts.finish_run(run_dir, "pretrain", {}, {"loss": 1.0}, {"paths": {"output_root": str(root)}}, time.time(),
                         promote=promote)


def latest(root):
    return (root / "pretrain" / "latest").resolve()


def test_runs_under_the_stage_root_are_published(tmp_path):
    root = tmp_path / "outputs"
    first = root / "pretrain" / "2026-01-01"
    finish(first, root)
    assert latest(root) == first.resolve()
    swept = root / "pretrain" / "multirun" / "2026-01-02" / "3"
    finish(swept, root)
    assert latest(root) == swept.resolve()


def test_a_run_kept_elsewhere_leaves_latest_and_says_so(tmp_path, caplog):
    root = tmp_path / "outputs"
    kept = root / "pretrain" / "good"
    finish(kept, root)
    elsewhere = tmp_path / "try" / "gpt2"
    with caplog.at_level(logging.WARNING, logger="lifecycle.artifacts"):
        finish(elsewhere, root)
    assert latest(root) == kept.resolve()
    assert json.loads((elsewhere / "manifest.json").read_text())["metrics"] == {"loss": 1.0}  # the run itself is kept
    assert "pretrain/latest" in caplog.text and "stays where it was" in caplog.text and str(elsewhere) in caplog.text
    # the stage root itself is not a run under it, and a sibling whose name merely starts alike is outside it
    finish(root / "pretrain", root)
    finish(root / "pretrain-old" / "x", root)
    assert latest(root) == kept.resolve()


def test_unpromoted_runs_leave_latest(tmp_path):
    root = tmp_path / "outputs"
    kept = root / "pretrain" / "good"
    finish(kept, root)
    finish(root / "pretrain" / "rejected", root, promote=False)
    assert latest(root) == kept.resolve()
