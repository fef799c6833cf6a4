"""`python -m lifecycle.data [overrides]` (also `lifecycle data`)."""
import hydra
from omegaconf import DictConfig

from lifecycle import CONF_DIR
from lifecycle.cli import guarded
from lifecycle.config import validate


@hydra.main(config_path=CONF_DIR, config_name="data", version_base="1.3")
@guarded
def main(cfg: DictConfig):
    validate(cfg, "data")  # seconds, before the heavy imports below
    from lifecycle.data.stage import run

    return run(cfg)


if __name__ == "__main__":
    main()
