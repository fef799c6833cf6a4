"""Training throughput: our Lightning step (CausalLM + Trainer) against a plain PyTorch loop.

Both train the same tiny Llama (conf/model/tiny_llama.yaml, same seed -> identical init) on the same fixed
batches of BPE-tokenised stdlib source, with the same AdamW, warm-up/cosine schedule and gradient clipping,
in alternating rounds in one process (ours, raw, ours, raw, ...), each round from a fresh model. It reports
the median steady-state tokens/s of each (the first --warmup steps of a round are discarded), their ratio
ours/raw, MFU against the float32 GEMM peak measured in the same run, and the per-step losses of both,
which must be equal. Goal: ratio >= 0.95 with equal losses. Figures go to benchmarks/results/train_throughput.json.

    HF_HUB_OFFLINE=1 python benchmarks/train_throughput.py --rounds 3 --steps 20 --batch-size 8 --seq-len 256
    python benchmarks/train_throughput.py --rounds 1 --steps 6 --batch-size 4 --seq-len 64 --model num_hidden_layers=2
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import statistics
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils.data import DataLoader, default_collate  # noqa: E402

from lifecycle.data.tokenizer import train_bpe  # noqa: E402
from lifecycle.hardware import measure_peak_flops, model_flops_per_token  # noqa: E402
from lifecycle.training.callbacks import Throughput  # noqa: E402
from lifecycle.training.datamodule import Windows  # noqa: E402
from lifecycle.training.module import IGNORE, CausalLM, weight_decay_groups  # noqa: E402
from lifecycle.training.schedule import warmup_cosine  # noqa: E402

OPTIMIZER = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)


def make_batches(args) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """`--steps` batches of (B, T) windows: stdlib source through a freshly trained BPE, or seeded random ids."""
    need = args.steps * args.batch_size * args.seq_len + 1
    if args.data == "random":
        tokens = np.random.default_rng(args.seed).integers(0, args.vocab_size, need, dtype=np.int64)
        ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    else:
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        texts, chars = [], 0
        for f in files:  # ~4 chars per token; at least 300 kB so the BPE learns real merges
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            chars += len(texts[-1])
            if chars > max(300_000, 6 * need):
                break
        tok = train_bpe(texts, args.vocab_size, min_frequency=2)
        eos = tok.eos_token_id
        encoded = tok.backend_tokenizer.encode_batch(texts)
        tokens = np.array([t for e in encoded for t in e.ids + [eos]], dtype=np.int64)
        if len(tokens) < need:
            raise SystemExit(f"only {len(tokens)} tokens of text for {need}; use --data random")
        ids = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": tok.pad_token_id}
    windows = Windows(tokens[:need], args.seq_len)
    B = args.batch_size
    return [default_collate([windows[i * B + j] for j in range(B)]) for i in range(args.steps)], ids


def build_model(args, ids: dict) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf/model/tiny_llama.yaml"), OmegaConf.from_dotlist(args.model))
    return instantiate(cfg, vocab_size=args.vocab_size, **ids)


def scheduler_partial(args):
    return functools.partial(warmup_cosine, warmup_steps=max(1, args.steps // 10), total_steps=args.steps,
                             min_lr_ratio=0.1)


class StepTimer(Callback):
    """perf_counter at the end of every optimizer step (data fetch, hooks and logging included) and its loss."""

    def __init__(self):
        self.ends, self.losses = [], []

    def on_train_start(self, trainer, pl_module):
        self.ends.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.ends.append(time.perf_counter())


def run_ours(args, batches, ids) -> tuple[list[float], list[float]]:
    module = CausalLM(build_model(args, ids), OPTIMIZER, scheduler_partial(args))
    timer = StepTimer()
    # The stage's own per-step accounting (tokens/s, MFU, metrics.jsonl) is part of "our step" and is timed too.
    history = Path(tempfile.mkdtemp()) / "metrics.jsonl"
    throughput = Throughput(args.flops_per_token, args.peak_flops, history)
    trainer = Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=args.steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      gradient_clip_val=1.0, num_sanity_val_steps=0, limit_val_batches=0,
                      callbacks=[timer, throughput])
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return timer.ends, timer.losses


def run_raw(args, batches, ids) -> tuple[list[float], list[float]]:
    model = build_model(args, ids)
    model.train()
    optimizer = OPTIMIZER(params=weight_decay_groups(model, OPTIMIZER.keywords["weight_decay"]))
    scheduler = scheduler_partial(args)(optimizer=optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]  # the order Lightning clips in
    ends, losses = [time.perf_counter()], []
    for batch in DataLoader(batches, batch_size=None):
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        ends.append(time.perf_counter())
    return ends, losses


def tokens_per_s(ends: list[float], args) -> float:
    steps = len(ends) - 1 - args.warmup
    return steps * args.batch_size * args.seq_len / (ends[-1] - ends[args.warmup])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per round")
    p.add_argument("--warmup", type=int, default=2, help="steps discarded at the start of each round")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads; on a busy machine more threads than free cores slow each step many-fold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=["text", "random"], default="text")
    p.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="tiny_llama overrides")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train_throughput.json")
    args = p.parse_args()
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|validation_step|LeafSpec).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    batches, ids = make_batches(args)
    probe = build_model(args, ids)
    fpt, n_params = model_flops_per_token(probe, args.seq_len), sum(q.numel() for q in probe.parameters())
    del probe
    peak = measure_peak_flops(torch.device("cpu"))
    args.flops_per_token, args.peak_flops = fpt, peak
    runs = {"ours": [], "raw": []}
    for r in range(args.rounds):
        for name, fn in (("ours", run_ours), ("raw", run_raw)):
            gc.collect()
            ends, losses = fn(args, batches, ids)
            runs[name].append({"tokens_per_s": tokens_per_s(ends, args), "losses": losses})
            print(f"round {r + 1}/{args.rounds} {name:>4}: {runs[name][-1]['tokens_per_s']:9.1f} tokens/s")

    tps = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in runs.items()}
    mfu = {k: v * fpt / peak for k, v in tps.items()}
    pairs = [(a, b) for o, w in zip(runs["ours"], runs["raw"]) for a, b in zip(o["losses"], w["losses"])]
    max_diff = max(abs(a - b) for a, b in pairs)
    first = min(10, args.steps)
    diff10 = max(abs(a - b) for a, b in zip(runs["ours"][0]["losses"][:first], runs["raw"][0]["losses"][:first]))
    ratio = tps["ours"] / tps["raw"]

    print(f"\nmodel {n_params / 1e6:.2f}M params, {fpt / 1e6:.1f} MFLOP/token; B={args.batch_size} "
          f"T={args.seq_len}, {args.threads} threads; GEMM peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'':>14} {'ours':>12} {'raw':>12}")
    print(f"{'tokens/s':>14} {tps['ours']:12.1f} {tps['raw']:12.1f}")
    print(f"{'MFU':>14} {mfu['ours']:12.2%} {mfu['raw']:12.2%}")
    for i in range(first):
        print(f"{f'loss step {i}':>14} {runs['ours'][0]['losses'][i]:12.6f} {runs['raw'][0]['losses'][i]:12.6f}")
    print(f"ratio ours/raw {ratio:.3f} (goal >= 0.95); max |loss diff| first {first} steps {diff10:.3g}, "
          f"all steps {max_diff:.3g}")

    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "versions": {"torch": torch.__version__, "lightning": lightning.__version__},
              "n_params": n_params, "flops_per_token": fpt, "peak_flops": peak,
              "tokens_per_s": tps, "mfu": mfu, "ratio": ratio, "max_abs_loss_diff_first10": diff10,
              "max_abs_loss_diff": max_diff, "rounds": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
