"""Sample generations, with the sampling settings recorded beside each."""
from __future__ import annotations

from pathlib import Path


def sampling_settings(max_new_tokens: int, temperature: float, top_k: int, seed: int) -> dict:
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "seed": seed,
            "do_sample": temperature > 0}


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, top_k: int,
             seed: int) -> list[dict]:
    """One completion per prompt with `generate` (an adapter-wrapped model works as well as a plain one)."""
    import torch

    settings = sampling_settings(max_new_tokens, temperature, top_k, seed)
    sampling = {"temperature": temperature, "top_k": top_k or None} if temperature > 0 else {}
    device = next(model.parameters()).device
    rows = []
    for prompt in prompts:
        torch.manual_seed(seed)
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
        completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        rows.append({"prompt": prompt, "completion": completion, **settings})
    return rows


def generate_samples(model_dir: Path, prompts: list[str], max_new_tokens: int, temperature: float, top_k: int,
                     seed: int) -> list[dict]:
    """Load a saved model directory exactly as a user would (`from_pretrained`), then `generate`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return generate(model, AutoTokenizer.from_pretrained(model_dir), prompts, max_new_tokens, temperature, top_k, seed)
