"""Quantization passes: int8 on CPU (torch.ao dynamic, the faster one measured here), 4-bit on a CUDA GPU."""
from __future__ import annotations

import importlib.util

from lifecycle.errors import ConfigError
from lifecycle.optimize.passes import Facts, Pass


class Int8(Pass):
    """Every nn.Linear to int8 weights (per output channel) with dynamically quantized activations, for CPU serving.

    torch.ao's quantize_dynamic, not torchao: it measured 129 tok/s against torchao int8 weight-only's 90 (fp32: 117)
    on the tiny Llama here, and torchao is not installed. Saved as int8 tensors + scales (lifecycle.models.int8).
    """
    kind = "int8"

    def check(self, facts: Facts) -> Facts:
        return super().check(facts).evolve(quantized=True)

    def apply(self, model, tuner):
        from lifecycle.models import int8

        return int8.quantize(model)


class Int4(Pass):
    """4-bit NF4 weights through bitsandbytes on a CUDA GPU (saved by transformers as safetensors)."""
    kind = "int4"

    def __init__(self, quant_type: str):
        if quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"pass int4: quant_type must be nf4 or fp4, got {quant_type!r}")
        self.quant_type = quant_type

    def check(self, facts: Facts) -> Facts:
        import torch

        facts = super().check(facts)
        if not torch.cuda.is_available():
            raise ConfigError("pass int4: 4-bit weights need a CUDA GPU and none is visible here; run on a GPU "
                              "machine, or use optimize=int8 for CPU serving")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("pass int4: needs the bitsandbytes library, which is not installed; "
                              "pip install bitsandbytes, or use optimize=int8")
        return facts.evolve(quantized=True)

    def apply(self, model, tuner):
        """Reload the model through transformers with a 4-bit quantization config (it owns the packing)."""
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        directory = tuner.scratch("int4")
        model.save_pretrained(directory, safe_serialization=True)
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cuda")
