"""The loaded model as the decode loop uses it: prefill and decode forwards, each under one adapter or the base."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from lifecycle.errors import CheckpointError
from lifecycle.serve import fastpath
from lifecycle.serve.batch import Batch
from lifecycle.serve.protocol import EngineError, ModelNotFound
from lifecycle.serve.sampler import TokenTexts

# Adapter types that wrap layers and switch per forward with set_adapter / disable_adapter_layers.
SERVABLE = ("LORA", "IA3", "BOTTLENECK")

log = logging.getLogger(__name__)


class ServedModel:
    """A base model, its tokenizer and the adapters loaded onto it; one adapter (or none) active per forward."""

    def __init__(self, model, tokenizer, base_name: str, fast_decode: bool = True, compile: bool = False,
                 native: bool | str = False):
        self.lm, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.wrapper = None           # what load_adapter returned: a PeftModel or our BottleneckModel
        self.tuner = None             # its tuner (LoraModel, IA3Model, BottleneckModel): switches adapter layers
        self.adapters: dict[str, str] = {}
        self.active: str | None = None  # the adapter whose layers are on; None: all off (the base)
        self.text = TokenTexts(tokenizer)
        self.eos = _eos_ids(model, tokenizer)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.compile = compile  # torch.compile the fast step (fastpath.FastDecoder)
        self.native = native  # the fast step in C (lifecycle.serve.native): True, False or "auto"
        # the base's decode steps; adapters use the HF forward
        self.fast = fastpath.build(model, compile, native) if fast_decode else None
        if not fast_decode:
            log.info("decode: the HF forward (fast_decode is off)")

    @property
    def vocab_size(self) -> int:
        return self.lm.config.vocab_size  # not the head's weight: an int8 variant's head has none

    def prefill(self, name: str, prompts: list[list[int]], all_logits: bool) -> tuple[list[torch.Tensor], Batch]:
        """Run prompts together (left-padded): per prompt its logits ((L, V), or (1, V) for the last token only),
        and a batch holding their keys and values, one row each."""
        self.select(name)
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)  # (n, width)
        valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=self.device)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # (n, width): each prompt counts from 0
        out = self.lm(input_ids=ids, attention_mask=valid.long(), position_ids=positions, use_cache=True,
                      logits_to_keep=0 if all_logits else 1)
        logits = [row[width - len(p):] if all_logits else row for row, p in zip(out.logits, prompts)]
        return logits, Batch.from_prefill(out.cache, valid)

    def decode(self, name: str, tokens: list[int], batch: Batch) -> torch.Tensor:
        """Logits (rows, V) for each row's next token after feeding `tokens` (one per row)."""
        self.select(name)
        positions, mask = batch.step_inputs(self.dtype)
        input_ids = torch.tensor(tokens, device=self.device)  # (rows,)
        fast = self._fast() if self.active is None else None
        if fast is not None:
            logits = fast(input_ids, positions[:, 0], mask, batch)
        else:
            logits = self.lm(input_ids=input_ids[:, None], position_ids=positions, attention_mask=mask, cache=batch,
                             use_cache=True).logits[:, -1]
        batch.advance()
        return logits

    def _fast(self):
        """The fast decode step (None: the HF forward), fused again if a weight was replaced since (a dtype change)."""
        if self.fast is not None and self.fast.stale():
            self.fast = fastpath.build(self.lm, self.compile, self.native)
        return self.fast

    def select(self, name: str) -> None:
        """Turn on `name`'s adapter layers (or none for the base); a no-op when already so."""
        wanted = None if name == self.base_name else name
        if self.tuner is None or wanted == self.active:
            return
        if wanted is None:
            self.tuner.disable_adapter_layers()
        else:
            if self.active is None:
                self.tuner.enable_adapter_layers()
            self.tuner.set_adapter(wanted, inference_mode=True)
        self.active = wanted

    def add_adapter(self, name: str, path: Path) -> None:
        """Load the adapter in `path` as `name` (servable types only)."""
        from lifecycle.models.adapters import load_adapter, read_config

        kind = read_config(path).get("peft_type")
        if kind not in SERVABLE:
            raise EngineError(
                f"adapter {name} ({path}) is a {kind} adapter; this engine serves {', '.join(SERVABLE)} adapters per "
                "request. Prompt-learning adapters (prompt/prefix tuning, P-tuning) need their virtual tokens fed "
                "with every prompt, which it does not do: merge a LoRA/IA3 adapter with `lifecycle optimize`, or "
                "serve this one with PEFT's generate")
        from peft import PeftModel

        try:
            self.wrapper = load_adapter(self.wrapper or self.lm, path, name)
        except CheckpointError as e:
            raise EngineError(str(e)) from None
        # A PeftModel holds its tuner as base_model; our BottleneckModel is the tuner itself. Either way the layers
        # are injected into self.lm in place, so forwards keep calling self.lm.
        self.tuner = self.wrapper.base_model if isinstance(self.wrapper, PeftModel) else self.wrapper
        self.adapters[name] = str(path)
        self.active = "?"  # loading may switch layers on or off: force the next select to set them
        self.select(self.base_name)

    def remove_adapter(self, name: str) -> None:
        """Drop adapter `name`; the last one out restores the plain base model."""
        if name not in self.adapters:
            raise ModelNotFound(f"no adapter named {name!r}; loaded: {sorted(self.adapters)}")
        del self.adapters[name]
        if self.adapters:
            self.tuner.delete_adapter(name)
            self.active = "?"
            self.select(self.base_name)
        else:
            self.lm, self.wrapper, self.tuner, self.active = self.tuner.unload(), None, None, None


def _eos_ids(model, tokenizer) -> set[int]:
    """Tokens that end a generation: the tokenizer's EOS and the model's generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else {configured} if configured is not None else set()
    return ids
