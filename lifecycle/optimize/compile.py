"""torch.compile for serving. Compiled code cannot be saved: the variant records the settings, the loader compiles."""
from __future__ import annotations

from lifecycle.errors import ConfigError
from lifecycle.optimize.passes import Facts, Pass

MODES = ("default", "reduce-overhead", "max-autotune")


class Compile(Pass):
    """The last pass: `load_model` applies `model.compile(mode=..., dynamic=...)`; its warm-up is in the report."""
    kind = "compile"

    def __init__(self, mode: str, dynamic: bool | None):
        if mode not in MODES:
            raise ConfigError(f"pass compile: mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode, self.dynamic = mode, dynamic

    def check(self, facts: Facts) -> Facts:
        if facts.adapter is not None or facts.compiled:
            super().check(facts)
        return facts.evolve(compiled=True)

    def apply(self, model, tuner):
        return model  # nothing to save: the settings travel in the variant record (optimize.json)

    def settings(self) -> dict:
        """The keyword arguments of nn.Module.compile the loader uses."""
        return {"mode": self.mode, "dynamic": self.dynamic}
