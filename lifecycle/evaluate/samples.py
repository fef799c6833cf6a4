"""Generations for a fixed prompt set, from a loaded model or an OpenAI-compatible endpoint, settings recorded."""
from __future__ import annotations

import json
import urllib.request

from lifecycle.errors import LifecycleError
from lifecycle.training.samples import generate, sampling_settings

ENDPOINT_TIMEOUT_S = 60


def complete(endpoint: str, model_name: str, headers: dict[str, str], prompts: list[str], max_new_tokens: int,
             temperature: float, top_k: int, seed: int) -> list[dict]:
    """One completion per prompt from <endpoint>/completions."""
    settings = sampling_settings(max_new_tokens, temperature, top_k, seed)
    rows = []
    for prompt in prompts:
        body = {"model": model_name, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": temperature,
                "seed": seed, **({"top_k": top_k} if top_k else {})}
        request = urllib.request.Request(f"{endpoint}/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(request, timeout=ENDPOINT_TIMEOUT_S) as response:
                completion = json.load(response)["choices"][0]["text"]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise LifecycleError(f"target.endpoint={endpoint}: POST /completions failed ({e}); check the server's "
                                 "log") from None
        rows.append({"prompt": prompt, "completion": completion, **settings})
    return rows
