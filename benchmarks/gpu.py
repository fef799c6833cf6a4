"""Issue 10's GPU goals on one CUDA device, in one short run (a lent device gives ~15 minutes in all):

B1: our training step (the pretrain stage's CausalLM under a Lightning Trainer, bf16-mixed) on a ~124M Llama
    (12 x 768, MLP 3,072, an 8,192-token vocabulary: decode_peers.py's 124m shape) over seeded random token batches;
    steady-state tokens/s and MFU against the best bf16 GEMM probe on the same device, before and after.
    Goal: MFU >= 50%.
B2: greedy batch-1 decoding of a model of that shape in bf16 by our serving step (ServedModel: the fast path, which
    the C step does not replace off the CPU), beside HF `generate()`; tokens/s and the bandwidth the weights are read
    at (decode_bytes_per_token x tokens/s) against the best read of a buffer of the weights' size on the device.
    Goal: >= 60% of that bandwidth.

Without CUDA it stops and says so. `--device cpu --tiny` runs the same code on the CPU with a small model: a check
that the script works (tests/unit/test_gpu_benchmark.py), whose figures say nothing about the goals. Figures go to
benchmarks/results/gpu.json (--out), with the device's name and the date.

    python benchmarks/gpu.py                       # on the GPU machine
    python benchmarks/gpu.py --device cpu --tiny --steps 6 --new-tokens 8
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import train_throughput as tt  # noqa: E402  (B1's batches, model, schedule and step timer)
from hydra.utils import instantiate  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lifecycle.hardware import (decode_bytes_per_token, measure_peak_flops, measure_read_bandwidth,  # noqa: E402
                                model_flops_per_token)
from lifecycle.training.module import CausalLM  # noqa: E402

BIG = ["hidden_size=768", "num_hidden_layers=12", "num_attention_heads=12", "num_key_value_heads=12",
       "intermediate_size=3072"]
TINY = ["hidden_size=64", "num_hidden_layers=2", "num_attention_heads=2", "num_key_value_heads=2",
        "intermediate_size=128"]
GOALS = {"b1_mfu": 0.50, "b2_bandwidth_fraction": 0.60}


def train(args, device: torch.device) -> dict:
    """B1: steady-state tokens/s and MFU of our step, bf16-mixed (fp32 on the CPU: bf16 there is emulated)."""
    batches, ids = tt.make_batches(args)
    probe = tt.build_model(args, ids)
    flops_per_token = model_flops_per_token(probe, args.seq_len)
    params = sum(p.numel() for p in probe.parameters())
    del probe
    gemm = torch.bfloat16 if device.type == "cuda" else torch.float32
    peaks = [measure_peak_flops(device, gemm, n=4096 if device.type == "cuda" else 1024)]
    module = CausalLM(tt.build_model(args, ids), instantiate(tt.OPTIMIZER_CONF), tt.scheduler_partial(args))
    timer = tt.StepTimer()
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
            max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, gradient_clip_val=1.0, num_sanity_val_steps=0, limit_val_batches=0,
            callbacks=[timer]).fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    peaks.append(measure_peak_flops(device, gemm, n=4096 if device.type == "cuda" else 1024))
    tokens_per_s = tt.tokens_per_s(timer.ends, args)
    peak = max(peaks)
    return {"params": params, "precision": precision, "batch": [args.batch_size, args.seq_len],
            "tokens_per_s": round(tokens_per_s, 1), "gemm_peak_tflops": round(peak / 1e12, 2),
            "mfu": round(tokens_per_s * flops_per_token / peak, 4), "warmup_s": round(tt.warmup_seconds(timer.ends,
                                                                                                        args), 2),
            "loss_first_last": [round(timer.losses[0], 3), round(timer.losses[-1], 3)]}


def tokenizer_for(vocab_size: int, directory: Path):
    """A byte-level BPE trained on a little stdlib source (the model is random: any tokenizer of its size does)."""
    import sysconfig

    from lifecycle.data.tokenizer import train_bpe

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    tok = train_bpe([f.read_text(encoding="utf-8", errors="replace") for f in files], vocab_size, min_frequency=2)
    tok.save_pretrained(directory)
    return tok


def decode(args, device: torch.device) -> dict:
    """B2: greedy batch-1 tokens/s of our serving step and HF generate(), and the bandwidth each reads weights at."""
    from lifecycle.serve.served import ServedModel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = tokenizer_for(args.vocab_size, Path(tempfile.mkdtemp()))
    ids = {"bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    model = tt.build_model(args, ids).to(device=device, dtype=dtype).eval()
    nbytes = decode_bytes_per_token(model)
    bandwidth = measure_read_bandwidth(device, nbytes=max(nbytes, 1 << 20))
    prompt = torch.randint(3, args.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    served = ServedModel(model, tok, "base", compile=args.compile, native="auto")
    runs = {}
    with torch.no_grad():
        for _ in range(2):  # the second pass is timed: the first one allocates and (with --compile) compiles
            logits, batch = served.prefill("base", [prompt], all_logits=False)
            token = int(logits[0][-1].argmax())
            sync()
            started = time.perf_counter()
            for _ in range(args.new_tokens):
                token = int(served.decode("base", [token], batch)[0].argmax())
            sync()
            ours = args.new_tokens / (time.perf_counter() - started)
        runs["ours_b1"] = ours
        del served, batch
        model.generation_config.pad_token_id = tok.pad_token_id
        inputs = torch.tensor([prompt], device=device)
        for _ in range(2):
            sync()
            started = time.perf_counter()
            out = model.generate(inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False)
            sync()
            runs["hf_eager_b1"] = (out.shape[1] - len(prompt)) / (time.perf_counter() - started)
    used = {name: rate * nbytes for name, rate in runs.items()}
    return {"dtype": str(dtype).removeprefix("torch."), "weight_bytes_per_token": nbytes,
            "read_bandwidth_GBps": round(bandwidth / 1e9, 1),
            "tokens_per_s": {name: round(rate, 1) for name, rate in runs.items()},
            "used_GBps": {name: round(u / 1e9, 1) for name, u in used.items()},
            "bandwidth_fraction": {name: round(u / bandwidth, 3) for name, u in used.items()},
            "step_us_for_goal": round(1e6 * nbytes / (GOALS["b2_bandwidth_fraction"] * bandwidth), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the goals) or cpu (a check that the script runs)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of width 64 instead of the ~124M one")
    p.add_argument("--steps", type=int, default=30, help="B1 optimizer steps")
    p.add_argument("--warmup", type=int, default=10, help="B1 steps left out of the tokens/s")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=256, help="B2 tokens decoded per timed pass")
    p.add_argument("--compile", action="store_true", help="B2: our step through torch.compile (serve's "
                   "deploy.engine.compile=true)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results/gpu.json")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on the GPU machine, or pass --device cpu --tiny to check "
                         "that the script itself works (its CPU figures say nothing about the GPU goals)")
    if args.steps <= args.warmup:
        args.warmup = max(0, args.steps // 2)
    args.data, args.model = "random", TINY if args.tiny else BIG
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else tt.cpu_model()
    result = {"device": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "model": args.model, "b1": train(args, device), "b2": decode(args, device), "goals": GOALS}
    b1, b2 = result["b1"], result["b2"]
    print(f"device: {name}; model {' '.join(args.model)} ({b1['params'] / 1e6:.1f}M params)")
    print(f"B1 train {b1['precision']}, batch {b1['batch']}: {b1['tokens_per_s']} tok/s, MFU {100 * b1['mfu']:.1f}% "
          f"of {b1['gemm_peak_tflops']} TFLOP/s measured (goal {100 * GOALS['b1_mfu']:.0f}%)")
    for run, rate in b2["tokens_per_s"].items():
        print(f"B2 decode {b2['dtype']} b1 {run}: {rate} tok/s, weights read at {b2['used_GBps'][run]} GB/s = "
              f"{100 * b2['bandwidth_fraction'][run]:.1f}% of {b2['read_bandwidth_GBps']} GB/s measured")
    print(f"B2 goal {100 * GOALS['b2_bandwidth_fraction']:.0f}%: a step of at most {b2['step_us_for_goal']} us")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
