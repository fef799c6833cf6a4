"""Fold a LoRA/IA3 adapter into its base weights (peft's merge_and_unload), so later passes see a plain model."""
from __future__ import annotations

from lifecycle.errors import ConfigError
from lifecycle.optimize.passes import MERGEABLE, Facts, Pass


class Merge(Pass):
    """The first pass of a variant whose source is an adapter directory."""
    kind = "merge"

    def check(self, facts: Facts) -> Facts:
        if facts.adapter is None:
            raise ConfigError("pass merge: source.model is a plain model, there is no adapter to merge; pick a "
                              "variant without merge (e.g. optimize=int8) or set source.model to an adapter dir")
        if facts.adapter not in MERGEABLE:
            kind = "our bottleneck adapter adds layers" if facts.adapter == "BOTTLENECK" else \
                "prompt-learning adapters add virtual tokens, not weight updates"
            raise ConfigError(f"pass merge: a {facts.adapter} adapter cannot merge into its base ({kind}); only "
                              f"{', '.join(MERGEABLE)} can. Optimize the base model and serve the adapter on it")
        return facts.evolve(adapter=None)

    def apply(self, model, tuner):
        return model.merge_and_unload()
