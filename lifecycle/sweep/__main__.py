"""`python -m lifecycle.sweep FILE [--trials N] [--local] [overrides...]` (the same as `lifecycle sweep ...`)."""
import argparse

from lifecycle.cli import guarded
from lifecycle.sweep.stage import run


def main() -> None:
    parser = argparse.ArgumentParser(prog="lifecycle sweep", description=run.__doc__)
    parser.add_argument("file", help="conf/hparams_search/<name>.yaml, sweeps/<name>.yaml, or just <name>")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides added to every trial, e.g. data.dir=...")
    parser.add_argument("--trials", type=int, default=None, help="trials in all (a resumed study counts its own)")
    parser.add_argument("--local", action="store_true", help="run a W&B sweep file through Optuna even when online")
    args = parser.parse_intermixed_args()
    guarded(lambda a: run(a.file, a.overrides, a.trials, a.local))(args)


if __name__ == "__main__":
    main()
