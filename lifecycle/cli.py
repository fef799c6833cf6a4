"""`lifecycle <stage> [hydra overrides]`: the same as `python -m lifecycle.<stage> [overrides]`."""
from __future__ import annotations

import functools
import importlib
import os
import sys

from lifecycle import CONF_DIR, STAGES
from lifecycle.errors import GateFailed, LifecycleError

USAGE = f"""usage: lifecycle <stage> [hydra overrides] [--help | --cfg job | -m ...]

stages: {', '.join(STAGES)}
sweeps: lifecycle sweep <file or name> [--trials N] [--local] [overrides]   (lifecycle sweep --help)
examples:
  lifecycle pipeline                           the whole loop on the embedded default data
  lifecycle pipeline experiment=smoke          the same, shrunk to under two minutes
  lifecycle pretrain model=tiny_llama optimizer.lr=1e-3 trainer.max_steps=500
  lifecycle pretrain --cfg job                 print the composed config
"""


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    stage = sys.argv[1]
    if stage not in STAGES and stage != "sweep":  # a sweep's argument is a file, so it is no Hydra app
        sys.exit(f"lifecycle: unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")
    # exec, not import: the stage then runs as `python -m lifecycle.<stage>`, which is also the command
    # Lightning re-launches for each DDP rank.
    os.execv(sys.executable, [sys.executable, "-m", f"lifecycle.{stage}", *sys.argv[2:]])


def stage_entry(stage: str):
    """The Hydra app of a stage: compose conf/<stage>.yaml, validate it in seconds, then import and run the stage."""
    import hydra

    from lifecycle.config import validate

    @hydra.main(config_path=CONF_DIR, config_name=stage, version_base="1.3")
    @guarded
    def main(cfg):
        validate(cfg, stage)  # before the stage's heavy imports (Lightning, transformers)
        return importlib.import_module(f"lifecycle.{stage}.stage").run(cfg)
    return main


def guarded(task):
    """Print a LifecycleError as one clear line and exit 2 (3: a failed evaluation gate), instead of a traceback."""
    @functools.wraps(task)
    def wrapper(cfg):
        try:
            return task(cfg)
        except LifecycleError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(3 if isinstance(e, GateFailed) else 2) from None
    return wrapper


if __name__ == "__main__":
    main()
