"""Convert a lifecycle (Hugging Face) model directory to GGUF for the llama.cpp peers: f32, f16 or q8_0.

Runs llama.cpp's own converter (convert_hf_to_gguf.py and its bundled gguf-py, shipped only in the llama.cpp source
tree, e.g. the llama-cpp-python sdist's vendor/llama.cpp). Our tokenizer is a byte-level BPE that llama.cpp's
pre-tokenizer table does not list by hash; its pre-tokenization is GPT-2's, so the converter is told "gpt-2".
Run it with a Python that has torch, transformers, numpy, sentencepiece and pyyaml (the peers' venv):

    make bench-peers
    .benchvenv/bin/python benchmarks/peers/gguf.py outputs/pretrain/latest/model /tmp/gguf/model-f32.gguf \
        --outtype f32 --llama-cpp .benchvenv/src/llama_cpp_python-0.3.36/vendor/llama.cpp
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    p.add_argument("--llama-cpp", type=Path, required=True, help="a llama.cpp source tree (has convert_hf_to_gguf.py)")
    args = p.parse_args()
    converter = args.llama_cpp / "convert_hf_to_gguf.py"
    if not converter.is_file():
        sys.exit(f"no {converter}: pass --llama-cpp a llama.cpp source tree (pip download --no-binary :all: "
                 "llama-cpp-python, then unpack; the tree is its vendor/llama.cpp)")
    sys.path[:0] = [str(args.llama_cpp), str(args.llama_cpp / "gguf-py")]
    import conversion.base as base

    for cls in vars(base).values():
        if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
            cls.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sys.argv = [str(converter), str(args.model), "--outfile", str(args.out), "--outtype", args.outtype]
    runpy.run_path(str(converter), run_name="__main__")


if __name__ == "__main__":
    main()
