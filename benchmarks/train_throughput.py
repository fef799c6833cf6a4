"""Training throughput: our Lightning step (CausalLM + Trainer) against a raw PyTorch loop, HF Trainer and plain Lightning.

All four train the same tiny Llama (conf/model/tiny_llama.yaml, same seed -> identical init) on the same fixed
batches of BPE-tokenised stdlib source in the same order, with the AdamW hyperparameters of conf/optimizer/adamw.yaml,
the same warm-up/cosine schedule, gradient clipping at 1.0 and fp32, in alternating rounds in one process (ours,
raw, hf_trainer, lightning; then raw, hf_trainer, lightning, ours; ...: the order rotates so that no one always runs
first), each round from a fresh model. Ours is the stage's module as configured
(conf/optimizer/adamw.yaml instantiated as is); each peer is what its users write: `torch.optim.AdamW(...)` and
F.cross_entropy on the logits for raw and plain Lightning (a LightningModule with training_step and
configure_optimizers, nothing logged), `transformers.Trainer` with TrainingArguments' default `optim`, our decay
groups and schedule (subclassed: HF decays embeddings and starts its warm-up at lr 0) and the batches as an
IterableDataset (HF samples a map-style dataset at random). It reports the median steady-state tokens/s of each
(the first --warmup steps of a round are discarded, and reported as one-off warm-up seconds), MFU against the
best float32 GEMM probe of the run (one before each round), the ratio ours / best peer, and each one's max |loss
difference| from ours over the first 10 steps. `--compile` adds ours with train.compile=true, compiling from an
empty cache in round 1 (a user's first run), and says after how many steps the compile time is repaid.
Goal (issue 10, B1): ours >= 1.05x the best peer and MFU >= 45%, losses equal. A peer that cannot be imported
is reported as skipped. Figures go to benchmarks/results/train_throughput.json.

    HF_HUB_OFFLINE=1 python benchmarks/train_throughput.py --rounds 3 --steps 20 --batch-size 8 --seq-len 256
    python benchmarks/train_throughput.py --rounds 1 --steps 6 --batch-size 4 --seq-len 64 --model num_hidden_layers=2
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
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
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, default_collate  # noqa: E402

from lifecycle.data.tokenizer import train_bpe  # noqa: E402
from lifecycle.hardware import measure_peak_flops, model_flops_per_token  # noqa: E402
from lifecycle.training.callbacks import Throughput  # noqa: E402
from lifecycle.training.datamodule import Windows  # noqa: E402
from lifecycle.training.module import IGNORE, CausalLM, weight_decay_groups  # noqa: E402
from lifecycle.training.schedule import warmup_cosine  # noqa: E402

OPTIMIZER_CONF = OmegaConf.load(ROOT / "conf/optimizer/adamw.yaml")
# The hyperparameters every peer uses; implementation flags (fused, foreach) are each tool's own default.
HPARAMS = {"lr": OPTIMIZER_CONF.lr, "weight_decay": OPTIMIZER_CONF.weight_decay,
           "betas": tuple(OPTIMIZER_CONF.betas), "eps": OPTIMIZER_CONF.eps}
PEERS = ("raw", "hf_trainer", "lightning")


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


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


class StepTimer(Callback):
    """perf_counter at the end of every optimizer step (data fetch, hooks and logging included) and its loss."""

    def __init__(self):
        self.ends, self.losses = [], []

    def on_train_start(self, trainer, pl_module):
        self.ends.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.ends.append(time.perf_counter())


def lightning_trainer(args, callbacks: list) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=args.steps, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   gradient_clip_val=1.0, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)


def run_ours(args, batches, ids, compile: bool = False) -> tuple[list[float], list[float]]:
    module = CausalLM(build_model(args, ids), instantiate(OPTIMIZER_CONF), scheduler_partial(args), compile=compile)
    timer = StepTimer()
    # The stage's own per-step accounting (tokens/s, MFU, metrics.jsonl) is part of "our step" and is timed too.
    history = Path(tempfile.mkdtemp()) / "metrics.jsonl"
    throughput = Throughput(args.flops_per_token, args.peak_flops, history)
    lightning_trainer(args, [timer, throughput]).fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return timer.ends, timer.losses


def run_raw(args, batches, ids) -> tuple[list[float], list[float]]:
    model = build_model(args, ids)
    model.train()
    optimizer = torch.optim.AdamW(weight_decay_groups(model, HPARAMS["weight_decay"]), **HPARAMS)
    scheduler = scheduler_partial(args)(optimizer=optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]  # the order Lightning clips in
    ends, losses = [time.perf_counter()], []
    for batch in DataLoader(batches, batch_size=None):
        optimizer.zero_grad(set_to_none=True)
        loss = cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        ends.append(time.perf_counter())
    return ends, losses


class PlainLM(LightningModule):
    """The LightningModule a user writes around a transformers model: loss, AdamW, a per-step schedule."""

    def __init__(self, model: torch.nn.Module, scheduler):
        super().__init__()
        self.model, self.scheduler = model, scheduler

    def training_step(self, batch, batch_idx):
        return cross_entropy(self.model(input_ids=batch["input_ids"]).logits, batch["labels"])

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(weight_decay_groups(self.model, HPARAMS["weight_decay"]), **HPARAMS)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler(optimizer=optimizer),
                                                         "interval": "step"}}


def run_lightning(args, batches, ids) -> tuple[list[float], list[float]]:
    timer = StepTimer()
    lightning_trainer(args, [timer]).fit(PlainLM(build_model(args, ids), scheduler_partial(args)),
                                         train_dataloaders=DataLoader(batches, batch_size=None))
    return timer.ends, timer.losses


class Samples(IterableDataset):
    """The same windows in the same order (HF Trainer samples a map-style dataset at random)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.batches = batches

    def __iter__(self):
        for batch in self.batches:
            for i in range(len(batch["input_ids"])):
                yield {k: v[i] for k, v in batch.items()}


def run_hf_trainer(args, batches, ids) -> tuple[list[float], list[float]]:
    import transformers

    class SameGroupsAndSchedule(transformers.Trainer):
        # Our decay groups (HF also decays embeddings) and our warm-up (HF's starts at lr 0), for equal losses.
        def get_decay_parameter_names(self, model):
            decay = {id(p) for p in weight_decay_groups(model, 0.0)[0]["params"]}
            return [n for n, p in model.named_parameters() if id(p) in decay]

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = scheduler_partial(args)(optimizer=optimizer or self.optimizer)
            return self.lr_scheduler

    class Timer(transformers.TrainerCallback):
        def on_train_begin(self, *_, **__):
            ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    def loss_fn(outputs, labels, num_items_in_batch=None):
        loss = cross_entropy(outputs.logits, labels)
        losses.append(loss.item())
        return loss

    ends, losses = [], []
    targs = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=HPARAMS["lr"], weight_decay=HPARAMS["weight_decay"], adam_beta1=HPARAMS["betas"][0],
        adam_beta2=HPARAMS["betas"][1], adam_epsilon=HPARAMS["eps"], max_grad_norm=1.0, seed=args.seed,
        use_cpu=True, report_to="none", logging_steps=10**9, save_strategy="no", eval_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = SameGroupsAndSchedule(model=build_model(args, ids), args=targs, train_dataset=Samples(batches),
                                    compute_loss_func=loss_fn, callbacks=[Timer()])
    trainer.train()
    return ends, losses


def tokens_per_s(ends: list[float], args) -> float:
    steps = len(ends) - 1 - args.warmup
    return steps * args.batch_size * args.seq_len / (ends[-1] - ends[args.warmup])


def warmup_seconds(ends: list[float], args) -> float:
    """What the first --warmup steps took beyond as many steady steps (one-off costs: compiling, allocating)."""
    steady = (ends[-1] - ends[args.warmup]) / (len(ends) - 1 - args.warmup)
    return ends[args.warmup] - ends[0] - args.warmup * steady


def cpu_model() -> str:
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return f"{names[0] if names else 'unknown CPU'} ({os.cpu_count()} logical CPUs)"


def available_peers(args) -> tuple[dict, dict]:
    runners, skipped = {"ours": run_ours, "raw": run_raw, "lightning": run_lightning}, {}
    if args.compile:
        runners["ours_compile"] = functools.partial(run_ours, compile=True)
    try:
        import transformers  # noqa: F401
        from transformers import Trainer as _  # noqa: F401  (needs accelerate)
        runners["hf_trainer"] = run_hf_trainer
    except ImportError as e:
        skipped["hf_trainer"] = str(e).splitlines()[0]
    order = [k for k in ("ours", "ours_compile", *PEERS) if k in runners]
    return {k: runners[k] for k in order}, skipped


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
    p.add_argument("--compile", action="store_true",
                   help="also run ours with train.compile=true (round 1 compiles from a cold cache; warm-up reported)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train_throughput.json")
    args = p.parse_args()
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|validation_step|LeafSpec).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)

    load = os.getloadavg()
    batches, ids = make_batches(args)
    probe = build_model(args, ids)
    fpt, n_params = model_flops_per_token(probe, args.seq_len), sum(q.numel() for q in probe.parameters())
    del probe
    # The GEMM peak is probed before every round and the best probe kept: one probe on a shared machine can land
    # in someone else's burst. (Ours' Throughput callback gets the first probe; it only feeds its own log.)
    peaks = [measure_peak_flops(torch.device("cpu"))]
    args.flops_per_token, args.peak_flops = fpt, peaks[0]
    if args.compile:  # a user's first run: nothing compiled yet on disk
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()
    runners, skipped = available_peers(args)
    runs = {name: [] for name in runners}
    for r in range(args.rounds):
        if r:
            peaks.append(measure_peak_flops(torch.device("cpu")))
        order = list(runners)[r % len(runners):] + list(runners)[:r % len(runners)]  # rotated: no one always first
        for name in order:
            fn = runners[name]
            gc.collect()
            ends, losses = fn(args, batches, ids)
            if len(ends) != args.steps + 1 or len(losses) != args.steps:
                raise SystemExit(f"{name}: {len(ends) - 1} step times and {len(losses)} losses for {args.steps}")
            runs[name].append({"tokens_per_s": tokens_per_s(ends, args), "warmup_s": warmup_seconds(ends, args),
                               "losses": losses})
            print(f"round {r + 1}/{args.rounds} {name:>10}: {runs[name][-1]['tokens_per_s']:9.1f} tokens/s",
                  flush=True)

    peak = max(peaks)
    tps = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in runs.items()}
    mfu = {k: v * fpt / peak for k, v in tps.items()}
    warm = {k: statistics.median(x["warmup_s"] for x in v) for k, v in runs.items()}
    peers = [k for k in runs if not k.startswith("ours")]
    others = [k for k in runs if k != "ours"]
    best = max(peers, key=tps.get)
    ratio = tps["ours"] / tps[best]
    first = min(10, args.steps)
    ours0 = runs["ours"][0]["losses"]
    diff10 = {k: max(abs(a - b) for a, b in zip(ours0[:first], runs[k][0]["losses"][:first])) for k in others}
    diff_all = {k: max(abs(a - b) for o, w in zip(runs["ours"], runs[k]) for a, b in zip(o["losses"], w["losses"]))
                for k in others}

    print(f"\n{cpu_model()}; load average {load[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print(f"model {n_params / 1e6:.2f}M params, {fpt / 1e6:.1f} MFLOP/token; B={args.batch_size} "
          f"T={args.seq_len}, {args.threads} threads; GEMM peak {peak / 1e9:.1f} GFLOP/s (best of "
          f"{', '.join(f'{q / 1e9:.0f}' for q in peaks)})")
    names = list(runs)
    print(f"{'':>14}" + "".join(f"{k:>13}" for k in names))
    print(f"{'tokens/s':>14}" + "".join(f"{tps[k]:13.1f}" for k in names))
    print(f"{'MFU':>14}" + "".join(f"{mfu[k]:13.2%}" for k in names))
    print(f"{'ours / it':>14}" + "".join(f"{tps['ours'] / tps[k]:13.3f}" for k in names))
    print(f"{'warm-up s':>14}" + "".join(f"{warm[k]:13.1f}" for k in names))
    for i in range(first):
        print(f"{f'loss step {i}':>14}" + "".join(f"{runs[k][0]['losses'][i]:13.6f}" for k in names))
    print(f"{'max |diff| 10':>14}{'':>13}" + "".join(f"{diff10[k]:13.3g}" for k in others))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"ratio ours / best peer ({best}) {ratio:.3f} (goal >= 1.05); MFU ours {mfu['ours']:.1%} (goal >= 45%)")
    compiled = {}
    if "ours_compile" in runs:
        step = {k: args.batch_size * args.seq_len / tps[k] for k in ("ours", "ours_compile")}
        cold = runs["ours_compile"][0]["warmup_s"] - runs["ours"][0]["warmup_s"]
        saved = step["ours"] - step["ours_compile"]
        compiled = {"ratio_to_best_peer": tps["ours_compile"] / tps[best], "speedup": tps["ours_compile"] / tps["ours"],
                    "cold_compile_s": cold, "warm_compile_s": warm["ours_compile"] - warm["ours"],
                    "payback_steps": cold / saved if saved > 0 else None}
        print(f"train.compile=true: {compiled['speedup']:.3f}x ours, {compiled['ratio_to_best_peer']:.3f}x {best}; "
              f"compile {cold:.0f} s cold ({compiled['warm_compile_s']:.0f} s cached), repaid after "
              f"{compiled['payback_steps'] or float('inf'):.0f} steps")

    import transformers
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": {"cpu": cpu_model(), "loadavg_start": load, "loadavg_end": os.getloadavg()},
              "versions": {"torch": torch.__version__, "lightning": lightning.__version__,
                           "transformers": transformers.__version__},
              "n_params": n_params, "flops_per_token": fpt, "peak_flops": peak, "peak_probes": peaks,
              "tokens_per_s": tps, "mfu": mfu, "warmup_s": warm, "best_peer": best, "ratio": ratio,
              "ratios": {k: tps["ours"] / tps[k] for k in others}, "goal": {"ratio": 1.05, "mfu": 0.45},
              "compile": compiled, "max_abs_loss_diff_first10": diff10, "max_abs_loss_diff": diff_all,
              "skipped": skipped, "rounds": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
