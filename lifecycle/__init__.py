"""lifecycle: the whole life of a language model from one Hydra config tree."""
from pathlib import Path

__version__ = "0.1.0"

# The config tree lives at the repository root (conf/), beside the package.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
STAGES = ("data", "pretrain", "finetune", "evaluate", "pipeline", "optimize", "compare", "cost", "usage", "serve", "monitor")
