"""Sample generations from a saved model directory, loaded exactly as a user would load it."""
from __future__ import annotations

from pathlib import Path

import torch


def generate_samples(model_dir: Path, prompts: list[str], max_new_tokens: int, temperature: float, top_k: int,
                     seed: int) -> list[dict]:
    """One completion per prompt via `from_pretrained` + `generate`, with the settings recorded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "seed": seed,
                "do_sample": temperature > 0}
    sampling = {"temperature": temperature, "top_k": top_k or None} if temperature > 0 else {}
    rows = []
    for prompt in prompts:
        torch.manual_seed(seed)
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
        completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        rows.append({"prompt": prompt, "completion": completion, **settings})
    return rows
