"""Short training runs for passes (recovery fine-tunes, distillation): the shared CausalLM on the data stage's
packed tokens, through the same make_trainer the pretrain stage uses."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

from omegaconf import DictConfig


class Tuner:
    """Trains a model in place for a number of steps with the stage's trainer/optimizer/scheduler/data settings."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)

    def scratch(self, name: str) -> Path:
        """A working directory for a pass, inside the run directory."""
        path = self.run_dir / "scratch" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def fit(self, model, steps: int, name: str, teacher=None, temperature: float = 2.0, alpha: float = 0.5) -> dict:
        """Train `model` for `steps` (distilling from `teacher` if given); validation loss before and after."""
        from lifecycle.config import build
        from lifecycle.training.run import make_module, make_trainer

        cfg = copy.deepcopy(self.cfg)
        cfg.trainer.max_steps = cfg.trainer.val_check_interval = steps  # the schedule follows max_steps
        run_dir = self.run_dir / "train" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        datamodule = build(cfg.data)
        module = make_module(cfg, model, teacher, temperature, alpha)
        trainer, _, _ = make_trainer(cfg, run_dir, model, None, [])
        result = {"val_loss_before": self._val_loss(trainer, module, datamodule)}
        if teacher is not None:
            result["teacher_val_loss"] = self._val_loss(trainer, make_module(cfg, teacher), datamodule)
        trainer.fit(module, datamodule=datamodule)
        result |= {"val_loss_after": self._val_loss(trainer, module, datamodule), "steps": trainer.global_step}
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the variant directory is the output
        model.eval()
        return result

    @staticmethod
    def _val_loss(trainer, module, datamodule) -> float:
        return round(trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"], 4)
