"""The loaded model as the decode loop uses it: prefill and decode forwards, each under one adapter or the base."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from lifecycle.errors import CheckpointError
from lifecycle.serve import fastpath
from lifecycle.serve.batch import GROW, Batch
from lifecycle.serve.protocol import EngineError, ModelNotFound
from lifecycle.serve.sampler import Sampler, TokenTexts

# Prompts go through the C step's prefill (lc_prefill) when the longest has at most NATIVE_PREFILL_LONGEST tokens and
# all together at most NATIVE_PREFILL_TOKENS (its scratch grows with them: ~41 MB at 1,024 tokens on a 120M Llama);
# otherwise through the HF forward (packed or padded). In float32 its products (panels: native_step.c) beat torch's
# GEMMs at every size measured on an AMD EPYC (2 threads, HF forward first): 120M, 8 prompts of 8-64 tokens 420-535
# -> 292-294 ms; one prompt of 128 tokens 224-303 -> 146-148, 256: 392-495 -> 298, 512: 760-940 -> 640-645; 11M, 512
# tokens 90-112 -> 68-72; but its attention, one query at a time, gains nothing by 1,024 (11M: 182-202 against
# 172-185). int8 weights: torch.ao's int8 GEMMs (VNNI) outrun its float32 arithmetic on int8 weights beyond ~2 GFLOP
# of layer work (120M: one 44-token prompt, 10 GFLOP, 31 against 53 ms; 8 prompts 150-159 against 315), so int8
# prompts past NATIVE_PREFILL_INT8_FLOPS keep torch.ao's forward (whose activation quantization differs from the
# decode steps').
NATIVE_PREFILL_LONGEST = 512
NATIVE_PREFILL_TOKENS = 1024
NATIVE_PREFILL_INT8_FLOPS = 2e9

# Columns a rebuilt batch reserves past its last at most (ServedModel.room): 2,048 x 8 rows x 12 layers of a 120M
# Llama's keys and values is 1.2 GB, left uninitialised (batch._empty), resident only as far as steps write it
# where the allocator maps fresh memory for it.
ROOM_MAX = 2048

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
        self.sampler = Sampler(native)  # sampled tokens drawn in C where the native library builds
        # the base's decode steps; adapters use the HF forward
        self.fast = fastpath.build(model, compile, native) if fast_decode else None
        self.packing = Packing.of(model)  # None: prompts are always left-padded
        # the prompts the C step prefills where it serves: longest, all tokens, all layer FLOPs (NATIVE_PREFILL_*)
        int8 = self.fast is not None and self.fast.int8
        self.native_prefill = (NATIVE_PREFILL_LONGEST, NATIVE_PREFILL_TOKENS,
                               NATIVE_PREFILL_INT8_FLOPS if int8 else float("inf"))
        self.layer_flops = layer_flops(model) if self.fast is not None else 0.0
        if not fast_decode:
            log.info("decode: the HF forward (fast_decode is off)")

    @property
    def vocab_size(self) -> int:
        return self.lm.config.vocab_size  # not the head's weight: an int8 variant's head has none

    def prefill(self, name: str, prompts: list[list[int]], all_logits: bool) -> tuple[list[torch.Tensor], Batch]:
        """Run prompts together (by the C step within NATIVE_PREFILL_*, else packed where that is cheaper, else
        left-padded): per prompt its logits ((L, V), or (1, V) for the last token only), and a batch holding their keys
        and values, one row each."""
        self.select(name)
        fast = self._fast() if name == self.base_name else None
        lengths = [len(p) for p in prompts]
        longest, tokens, flops = self.native_prefill
        if (fast is not None and fast.native is not None and not all_logits and max(lengths) <= longest
                and sum(lengths) <= tokens and sum(lengths) * self.layer_flops <= flops):
            batch = Batch.empty(lengths, len(fast.layers), fast.kv_heads, fast.head_dim, self.dtype)
            return [row[None] for row in fast.native.prefill(prompts, batch)], batch
        if self.packing is not None and self.packing.pays(lengths):
            return self._prefill_packed(prompts, all_logits, _reads_spare_columns(fast))
        width = max(lengths)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)  # (n, width)
        valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=self.device)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # (n, width): each prompt counts from 0
        out = self.lm(input_ids=ids, attention_mask=valid.long(), position_ids=positions, use_cache=True,
                      logits_to_keep=0 if all_logits else 1)
        logits = [row[width - len(p):] if all_logits else row for row, p in zip(out.logits, prompts)]
        batch = Batch.from_prefill(out.cache, valid)
        batch.zeroed = _reads_spare_columns(fast)
        return logits, batch

    def _prefill_packed(self, prompts: list[list[int]], all_logits: bool,
                        zeroed: bool) -> tuple[list[torch.Tensor], Batch]:
        """The prompts as one sequence, positions restarting at each, under a block-diagonal causal mask: no padding
        tokens go through the model (8 of the benchmark's prompts: 369 tokens instead of 496 left-padded; 390 ms instead of
        520 on a 120M Llama)."""
        lengths = [len(p) for p in prompts]
        ids = torch.tensor([[token for p in prompts for token in p]], device=self.device)  # (1, T)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])[None]
        prompt = torch.repeat_interleave(torch.arange(len(prompts), device=self.device),
                                         torch.tensor(lengths, device=self.device))  # (T,): which prompt
        causal = positions[0][:, None] >= positions[0][None, :]
        allowed = (prompt[:, None] == prompt[None, :]) & causal
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)  # additive: right for sdpa and eager alike
        ends = torch.tensor(lengths, device=self.device).cumsum(0)  # one past each prompt's last token
        out = self.lm(input_ids=ids, attention_mask=mask[None, None], position_ids=positions, use_cache=True,
                      logits_to_keep=0 if all_logits else ends - 1)
        if all_logits:
            logits = [out.logits[0, int(e) - n:int(e)] for e, n in zip(ends, lengths)]
        else:
            logits = [row[None] for row in out.logits[0]]  # (1, V) each
        return logits, Batch.from_packed(out.cache, lengths, zeroed)

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

    def room(self, name: str, need: int) -> int:
        """Columns to reserve past a rebuilt batch's t for model `name`'s rows, which may write `need` more each.
        On the CPU all of them, up to ROOM_MAX: reserved columns are left uninitialised, and a batch that runs out
        is copied whole. GROW under the compiled torch step, which attends over every reserved column, and off the
        CPU."""
        if self.device.type != "cpu" or _reads_spare_columns(self._fast() if name == self.base_name else None):
            return GROW
        return min(max(need, GROW), ROOM_MAX)

    def runs_ahead(self, name: str) -> bool:
        """Whether `name`'s rows can take several steps in one call (decode_run): the base model under the C step,
        whose head's every token has an embedding row to be fed back, and (for sampled rows) draws in C."""
        fast = self._fast() if name == self.base_name else None
        return fast is not None and fast.native is not None and fast.native.runs_ahead and self.sampler.native

    def decode_run(self, name: str, tokens: list[int], batch: Batch, k: int, draws=None,
                   logprobs: bool = False) -> tuple[list[list[int]], list[list[float]] | None]:
        """k steps for every row (runs_ahead(name) must hold), feeding `tokens`, then each row's own token: its
        argmax, or where `draws` (per row: temperature, top_k, top_p, seed, counter of the first token; None: all
        greedy) has a temperature, self.sampler's draw. Each row's k tokens, the same as k calls of decode with
        each token chosen from the logits and fed back; -1 where nothing could be drawn (the row's tokens after it
        are meaningless). With `logprobs`, also each token's log-prob (log_softmax of its step's logits, to float
        rounding), else None."""
        self.select(name)
        batch.claim(k, self.dtype)
        ids = torch.tensor(tokens)
        out, chosen = self.fast.native.run(ids, batch.positions, batch, k, draws, logprobs)  # runs_ahead checked
        batch.advance(k)
        return out.tolist(), chosen.tolist() if chosen is not None else None

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


class Packing:
    """When a prefill of several prompts runs them packed into one sequence rather than left-padded to the longest.

    Padded, n prompts of width w cost n * w tokens through the layers and n * w * w attention pairs (sdpa computes
    the masked ones too); packed, T = sum of lengths tokens and T * T pairs. Packing is chosen when its estimated
    FLOPs are lower, and never past MAX_TOKENS (the (T, T) mask). Only for the Llama-layout families the fast decode
    path knows (their position ids and 4-d masks are honoured exactly) under sdpa or eager attention; a sliding
    window shorter than the positions is already excluded there."""

    MAX_TOKENS = 4096

    def __init__(self, token_flops: float, pair_flops: float):
        self.token_flops, self.pair_flops = token_flops, pair_flops

    @classmethod
    def of(cls, model) -> Packing | None:
        config = model.config
        if fastpath.unsupported(model) or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
            return None
        q = config.num_attention_heads * model.model.layers[0].self_attn.head_dim
        return cls(layer_flops(model), 4.0 * q * config.num_hidden_layers)

    def pays(self, lengths: list[int]) -> bool:
        n, width, total = len(lengths), max(lengths), sum(lengths)
        if n == 1 or total == n * width or total > self.MAX_TOKENS:
            return False
        padded = n * width * self.token_flops + n * width * width * self.pair_flops
        return total * self.token_flops + total * total * self.pair_flops < padded


def _reads_spare_columns(fast) -> bool:
    """Whether decode steps by `fast` (the base's fast step; None: the HF forward) attend over a batch's every
    column, masked (the compiled torch step, whose shapes must not change per step), so the columns past t must hold
    zeros (Batch.zeroed), not garbage."""
    return fast is not None and fast.native is None and fast.compiled is not None


def layer_flops(model) -> float:
    """FLOPs of one token through the layers' projections (2 x their weights; the head runs on last tokens only)."""
    layer_groups = fastpath.projection_groups(model)[1:]
    return 2.0 * sum(linear.in_features * linear.out_features for group in layer_groups for linear in group)


def _eos_ids(model, tokenizer) -> set[int]:
    """Tokens that end a generation: the tokenizer's EOS and the model's generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else {configured} if configured is not None else set()
    return ids
