"""Distillation: a smaller student (a share of the teacher's layers and width) trained on the teacher's softened
logits mixed with cross-entropy, by the shared CausalLM (its teacher option) and the pretrain stage's Trainer."""
from __future__ import annotations

import re

from lifecycle.optimize.passes import Facts, Pass, require

LAYER_KEY = re.compile(r"\.(layers|h)\.(\d+)\.")  # decoder layer index in Llama-style and GPT-2-style state dicts


class Distill(Pass):
    """Student = teacher config with `layer_share` of its layers and `width_share` of its hidden/MLP width.

    At full width the student starts from the teacher's embeddings and evenly spaced layers (a far better start
    than random on a small budget); a narrower student starts from random weights.
    """
    kind = "distill"

    def __init__(self, layer_share: float, width_share: float, temperature: float, alpha: float, steps: int):
        require(0 < layer_share <= 1 and 0 < width_share <= 1 and layer_share * width_share < 1,
                f"pass distill: layer_share and width_share must be in (0, 1] and not both 1, got {layer_share}, "
                f"{width_share}")
        require(temperature > 0, f"pass distill: temperature must be > 0, got {temperature}")
        require(0 <= alpha <= 1, f"pass distill: alpha (weight of the KL term) must be in [0, 1], got {alpha}")
        require(steps >= 1, f"pass distill: steps must be >= 1, got {steps}")
        self.layer_share, self.width_share = layer_share, width_share
        self.temperature, self.alpha, self.steps = temperature, alpha, steps

    def check(self, facts: Facts) -> Facts:
        facts = super().check(facts)
        heads = facts.config.get("num_attention_heads") or facts.config.get("n_head")
        require(self.width_share == 1 or heads is not None,
                f"pass distill: cannot narrow a {facts.model_type} model (its config names no attention heads)")
        return facts

    def apply(self, model, tuner):
        student = self.student(model)
        self.training = tuner.fit(student, self.steps, name=self.kind, teacher=model.eval(),
                                  temperature=self.temperature, alpha=self.alpha)
        return student

    def student(self, teacher):
        """A fresh model of the teacher's type, `layer_share` as deep and `width_share` as wide."""
        from transformers import AutoModelForCausalLM

        config = teacher.config.__class__.from_dict(teacher.config.to_dict())
        layers = config.num_hidden_layers
        config.num_hidden_layers = max(1, round(layers * self.layer_share))
        if self.width_share < 1:
            heads = config.num_attention_heads
            head_dim = max(1, round(config.hidden_size * self.width_share / heads))
            config.hidden_size = head_dim * heads
            if getattr(config, "head_dim", None):
                config.head_dim = head_dim
            if getattr(config, "intermediate_size", None):
                config.intermediate_size = round(config.intermediate_size * self.width_share)
        student = AutoModelForCausalLM.from_config(config)
        if self.width_share == 1:
            _copy_layers(teacher, student, layers, config.num_hidden_layers)
        return student


def _copy_layers(teacher, student, n_teacher: int, n_student: int) -> None:
    """Load the teacher's non-layer weights and its layers at evenly spaced depths into the student."""
    picked = [round(i * (n_teacher - 1) / max(1, n_student - 1)) for i in range(n_student)]
    index = {t: s for s, t in enumerate(picked)}
    state = {}
    for key, value in teacher.state_dict().items():
        match = LAYER_KEY.search(key)
        if match is None:
            state[key] = value
        elif int(match.group(2)) in index:
            state[LAYER_KEY.sub(f".{match.group(1)}.{index[int(match.group(2))]}.", key, count=1)] = value
    student.load_state_dict(state, strict=True)
