"""A variant's output: a model directory `load_model` reads back, with optimize.json naming the passes."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from lifecycle import artifacts
from lifecycle.models import int8
from lifecycle.models.load import VARIANT


def save(model, tokenizer, directory: Path, name: str, passes: list, source: dict) -> Path:
    """Write the model (int8 tensors + scales, or save_pretrained), tokenizer and variant record atomically."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    quantization = None
    if int8.quantized_names(model):
        model.config.save_pretrained(tmp)
        quantization = int8.save(model, tmp)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    compiled = [p.settings() for p in passes if p.kind == "compile"]
    artifacts.write_json(tmp / VARIANT, {"variant": name, "passes": [p.record() for p in passes], "source": source,
                                         "quantization": quantization, "compile": compiled[0] if compiled else None})
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory
