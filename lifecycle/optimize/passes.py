"""What every optimization pass shares: the facts it is checked against before any work, and its interface.

Each `conf/pass/*.yaml` builds one pass through its `_target_`; a variant (`conf/optimize/*.yaml`) lists passes in
the order they apply. `check` sees only facts read from config files, so a pass that cannot apply is refused in
seconds, before a model loads; `apply` does the work and returns the new model.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from lifecycle.errors import ConfigError

# PEFT types whose update folds into the base weights (peft's merge_and_unload).
MERGEABLE = ("LORA", "IA3", "ADALORA", "LOHA", "LOKR")


@dataclass(frozen=True)
class Facts:
    """What the model entering a pass is, as far as the files say."""
    model_type: str
    config: dict = field(repr=False)
    adapter: str | None = None       # the adapter's peft_type while it is not merged
    quantized: bool = False
    compiled: bool = False

    def evolve(self, **changes) -> "Facts":
        return replace(self, **changes)


class Pass:
    """One step of a variant. Subclasses set `kind` and override `check` (calling super) and `apply`."""
    kind = "pass"

    def check(self, facts: Facts) -> Facts:
        """Raise ConfigError (reason and fix) if the pass cannot apply; return the facts after it."""
        if facts.adapter is not None:
            fix = ("put the merge pass first (e.g. optimize=merge_int8)" if facts.adapter in MERGEABLE else
                   f"{facts.adapter} adapters cannot merge into their base; optimize the base model instead and "
                   "serve the adapter on it")
            raise ConfigError(f"pass {self.kind}: source.model is an unmerged {facts.adapter} adapter; {fix}")
        if facts.compiled:
            raise ConfigError(f"pass {self.kind}: comes after compile; compile must be the last pass")
        if facts.quantized:
            raise ConfigError(f"pass {self.kind}: comes after int8 quantization, which must be last (before "
                              "compile): reorder the variant's passes")
        return facts

    def apply(self, model, tuner):
        """The model after this pass; `tuner` trains it further where the pass asks for it."""
        raise NotImplementedError

    def record(self) -> dict:
        """What the pass did, for the variant's manifest (the settings, plus whatever apply measured)."""
        return {"kind": self.kind, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
