"""A Hydra callback for sweep tests: each process (each DDP rank) records the hyperparameters it composed."""
import json
import os
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf


class RankEcho(Callback):
    def on_job_start(self, config, **kwargs) -> None:
        rank = os.environ.get("LOCAL_RANK", "0")
        seen = {k: OmegaConf.select(config, k) for k in ("optimizer.lr", "scheduler.warmup_steps")}
        out = Path(os.environ["RANK_ECHO_DIR"]) / f"rank{rank}-{os.getpid()}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(seen))
