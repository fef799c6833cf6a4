"""Pruning passes: unstructured magnitude pruning (zeros, same shapes) and structured pruning (whole attention heads
and MLP neurons removed, so the model really shrinks), each with an optional recovery fine-tune."""
from __future__ import annotations

from lifecycle.errors import ConfigError
from lifecycle.optimize.passes import Facts, Pass, require

# Model types whose decoder layers are self_attn.{q,k,v,o}_proj + mlp.{gate,up,down}_proj (the Llama layout).
LLAMA_LAYOUT = ("llama", "mistral", "qwen2", "qwen3")


def _check_share(kind: str, name: str, share: float) -> None:
    require(0 < share < 1, f"pass {kind}: {name} must be in (0, 1), got {share} (0.5 = remove half)")


class Magnitude(Pass):
    """Zero the `sparsity` share of smallest-magnitude weights in every decoder Linear (embeddings and head kept)."""
    kind = "magnitude"

    def __init__(self, sparsity: float, recovery_steps: int):
        _check_share(self.kind, "sparsity", sparsity)
        require(recovery_steps >= 0, f"pass {self.kind}: recovery_steps must be >= 0, got {recovery_steps}")
        self.sparsity, self.recovery_steps = sparsity, recovery_steps

    def apply(self, model, tuner):
        import torch
        from torch.nn.utils import prune

        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                prune.l1_unstructured(module, "weight", amount=self.sparsity)
        if self.recovery_steps:  # the masks stay on during recovery, so pruned weights stay zero
            self.recovery = tuner.fit(model, self.recovery_steps, name=self.kind)
        for module in model.modules():
            if prune.is_pruned(module) and hasattr(module, "weight_orig"):
                prune.remove(module, "weight")
        return model


class Structured(Pass):
    """Remove the `share` of attention heads (whole key/value groups) and of MLP neurons with the smallest weight
    norms, the same count in every layer so the saved config describes the model (Llama-layout models)."""
    kind = "structured"

    def __init__(self, share: float, recovery_steps: int):
        _check_share(self.kind, "share", share)
        require(recovery_steps >= 0, f"pass {self.kind}: recovery_steps must be >= 0, got {recovery_steps}")
        self.share, self.recovery_steps = share, recovery_steps

    def check(self, facts: Facts) -> Facts:
        facts = super().check(facts)
        if facts.model_type not in LLAMA_LAYOUT:
            raise ConfigError(f"pass structured: supports {', '.join(LLAMA_LAYOUT)} models, not "
                              f"{facts.model_type!r}; use unstructured pruning (optimize=prune50) or distillation")
        from lifecycle.optimize.heads import kept_groups

        c = facts.config
        heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
        require(kept_groups(kv, heads // kv, c["hidden_size"], self.share) is not None,
                f"pass structured: no smaller count of the {heads} attention heads divides hidden_size "
                f"{c['hidden_size']} (transformers requires it); use optimize=distill_half or optimize=prune50")
        return facts

    def apply(self, model, tuner):
        from lifecycle.optimize.heads import shrink

        shrink(model, self.share)
        if self.recovery_steps:
            self.recovery = tuner.fit(model, self.recovery_steps, name=self.kind)
        return model
