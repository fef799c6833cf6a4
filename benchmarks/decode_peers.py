"""B2 decoding and B3 int8 against peers: our engine, HF generate() (eager; static cache + torch.compile), llama.cpp.

B2 (default): fixed prompts (seeded token ids, 8-64 tokens), greedy, --new-tokens each, on the trained tiny model
(outputs/pretrain/latest/model) or, with --size 124m, a randomly initialised Llama of GPT-2-small size (12 x 768,
3072 MLP, the tiny model's 8,192 vocab: ~120M parameters) where the matmuls, not Python, dominate. The runs take
turns over the prompts (2 a turn at batch 1, 8 batched), the order rotated each turn, so load changes fall on all
alike (llama.cpp in a child process of --peer-python's venv, on the same weights as GGUF f32):
  hf_eager_b1, hf_compile_b1   HF generate() eager; with cache_implementation="static" and torch.compile'd forward
                               (its compile warm-up, one pass over every prompt, is timed apart)
  engine_b1, engine_c8         our LocalEngine as configured by default (its own process, as a server; the decode step
                               in C, deploy.engine.native=auto), one request at a time; 8 concurrent
  engine_torch_b1, _c8         the same with deploy.engine.native=false (the torch fast path, eager)
  engine_compiled_b1, _c8      with --engine-compile: native=false, compile=true (start-up, compile included, apart)
  hf_eager_b8                  HF generate() on left-padded batches of 8
  llama_cpp_b1                 llama-cpp-python's generate() (greedy), the KV cache reset per prompt
Greedy tokens of every run are compared with hf_eager_b1's (same tokens up to EOS). llama.cpp batch 8 is reported
as skipped: the Python binding has no batched generation.

B3 (--int8): the same decode runs on int8 weights at equal quality: ours (`lifecycle optimize optimize=int8`'s
per-channel torch.ao int8, served by our engine), a user's one-line torch.ao `quantize_dynamic(model, {nn.Linear})`
under HF generate(), and llama.cpp q8_0; plus the perplexity of each (and fp32's) on held-out stdlib source. Our
engine decodes int8 weight-only in C (x @ (q * scale)), and prefills that way too up to 2 GFLOP of prompt (torch.ao's
forward beyond): ours_int8_weight_only is the perplexity of that arithmetic (a float32 model holding q * scale),
ours_int8 the torch.ao forward's.
Goals (issue 10): B2 >= 3x HF eager, >= 1x llama.cpp f32 on the 124M model; B3 perplexity change <= 1%, >= 1.2x
torch.ao, >= 1x q8_0. Figures go to benchmarks/results/decode_peers[-124m][-int8].json.

    python benchmarks/decode_peers.py                       # B2, tiny model
    python benchmarks/decode_peers.py --size 124m --prompts 32 --new-tokens 128
    python benchmarks/decode_peers.py --int8
llama.cpp's venv and source tree (the GGUF converter ships only there): `make bench-peers`, ~13 min on 2 cores.
(A GGML_NATIVE=ON build uses this CPU's AMX-INT8 tiles and segfaulted on every q8_0 evaluation of our models here;
f32 ran. The Makefile builds with AMX off: q8_0 then runs on AVX512-VNNI.)
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / ".benchvenv"  # `make bench-peers`
LLAMA_SRC = next(iter(sorted((PEERS / "src").glob("llama_cpp_python-*/vendor/llama.cpp"))), None)


# ---- llama.cpp side (runs inside --peer-python's venv) ------------------------------------------------------------

def llama_main(job: Path) -> None:
    """Decode the prompts greedily and/or score perplexity with llama-cpp-python; writes job's result file."""
    import numpy as np
    from llama_cpp import Llama

    spec = json.loads(job.read_text())
    out = {}
    llm = Llama(spec["gguf"], n_ctx=spec["n_ctx"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                logits_all=bool(spec.get("ppl")), verbose=False)
    eos = llm.token_eos()
    if spec.get("prompts"):
        outputs, ttft, started = [], [], time.perf_counter()
        for prompt in spec["prompts"]:
            llm.reset()
            t0, ids = time.perf_counter(), []
            for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                      reset=True):
                if not ids:
                    ttft.append(time.perf_counter() - t0)
                ids.append(int(token))
                if token == eos or len(ids) >= spec["new_tokens"]:
                    break
            outputs.append(ids)
        out["decode"] = {"seconds": time.perf_counter() - started, "outputs": outputs, "ttft": ttft}
    if spec.get("ppl"):
        nll, count = 0.0, 0
        for window in spec["ppl"]:
            llm.reset()
            llm.eval(window)
            logits = np.asarray(llm.scores[:len(window)], dtype=np.float64)
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nll -= float(logp[np.arange(len(window) - 1), window[1:]].sum())
            count += len(window) - 1
        out["ppl"] = float(np.exp(nll / count))
    job.with_suffix(".out.json").write_text(json.dumps(out))


def run_llama(gguf: Path, python: Path, threads: int, prompts=None, new_tokens: int = 0, ppl=None) -> dict:
    with tempfile.TemporaryDirectory(prefix="llama-") as tmp:
        job = Path(tmp) / "job.json"
        width = max([len(p) for p in prompts or []] + [len(w) for w in ppl or []]) + new_tokens + 8
        job.write_text(json.dumps({"gguf": str(gguf), "threads": threads, "n_ctx": width, "prompts": prompts,
                                   "new_tokens": new_tokens, "ppl": ppl}))
        proc = subprocess.run([str(python), __file__, "--llama-run", str(job)], capture_output=True, text=True)
        if proc.returncode != 0:
            crash = ", a crash" if proc.returncode < 0 else ""
            raise RuntimeError(f"llama.cpp run failed (exit {proc.returncode}{crash}): {proc.stderr[-2000:]}")
        return json.loads(job.with_suffix(".out.json").read_text())


def convert(model: Path, out: Path, outtype: str, python: Path) -> Path:
    if not out.is_file():
        proc = subprocess.run([str(python), str(ROOT / "benchmarks/peers/gguf.py"), str(model), str(out), "--outtype",
                               outtype, "--llama-cpp", str(LLAMA_SRC)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"GGUF conversion failed: {proc.stderr[-2000:]}")
    return out


# ---- our side -----------------------------------------------------------------------------------------------------

def big_model(tmp: Path, tokenizer_dir: Path) -> Path:
    """A random ~120M Llama (12 x 768, MLP 3072) with the tiny model's tokenizer, saved to tmp/model-124m."""
    import torch
    from transformers import AutoTokenizer

    from lifecycle.models.build import llama
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = llama(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                  intermediate_size=3072, max_position_embeddings=1024, rope_theta=10000.0, attention_dropout=0.0,
                  tie_word_embeddings=True, vocab_size=len(tokenizer),
                  bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(tmp / "model-124m")
    tokenizer.save_pretrained(tmp / "model-124m")
    return tmp / "model-124m"


def heldout_windows(tokenizer, n: int, length: int) -> list[list[int]]:
    """n windows of `length` tokens from stdlib files the default corpus's val split is unlikely to hold verbatim."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[::-1]
    windows = []
    for path in files:
        ids = tokenizer(path.read_text(encoding="utf-8", errors="replace")).input_ids
        windows += [ids[i:i + length] for i in range(0, len(ids) - length, length)][:2]
        if len(windows) >= n:
            return windows[:n]
    return windows


def perplexity(model, windows: list[list[int]]) -> float:
    import torch
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            loss = model(input_ids=ids, labels=ids).loss
            nll += float(loss) * (len(w) - 1)
            count += len(w) - 1
    return float(torch.exp(torch.tensor(nll / count)))


def dequantized(model, quantized):
    """`model` (float32) holding `quantized`'s int8 weights times their scales: the arithmetic of our C step's
    weight-only int8 (lifecycle.serve.native)."""
    import torch

    with torch.no_grad():
        for name, module in quantized.named_modules():
            if hasattr(module, "weight") and callable(module.weight):
                model.get_submodule(name).weight.copy_(module.weight().dequantize())
    return model


def hf_compiled(model):
    """HF's recipe for fast generate(): a static KV cache and a torch.compile'd forward."""
    import torch
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward)
    return model


def llama_part(gguf: Path, args, prompts, eos: int) -> dict:
    """One turn of llama.cpp (a child process; its own timing excludes loading the model)."""
    from serve_engine import until_eos
    result = run_llama(gguf, args.peer_python, args.threads, prompts=prompts, new_tokens=args.new_tokens)["decode"]
    return {"outputs": [until_eos(o, eos) for o in result["outputs"]], "seconds": result["seconds"],
            "ttft": result["ttft"]}


async def take_turns(engine_dir: Path, args, prompts, b1: dict, batched: dict, warmup: dict,
                     prefix: str = "engine") -> dict:
    """Our engine on engine_dir (in its own process, as a server runs it: serve_engine.EngineProcess) beside the
    peers' runners, taking turns over the prompts (serve_engine's taking_turns): batch 1 two prompts a turn, then
    `concurrency` concurrent (ours) or batched (peers)."""
    from serve_engine import EngineProcess, taking_turns

    c, n = args.concurrency, args.new_tokens
    engines = {prefix: EngineProcess(engine_dir, max_batch_size=c, max_queue=len(prompts), threads=args.threads),
               f"{prefix}_torch": EngineProcess(engine_dir, max_batch_size=c, max_queue=len(prompts),
                                                threads=args.threads, native=False)}
    if args.engine_compile and not args.int8:  # deploy.engine.compile=true; int8 modules are not compiled
        engines[f"{prefix}_compiled"] = EngineProcess(engine_dir, max_batch_size=c, max_queue=len(prompts),
                                                      threads=args.threads, compile=True, native=False)
        warmup[f"{prefix}_compiled"] = round(engines[f"{prefix}_compiled"].start_s, 1)
    try:
        runs = await taking_turns({**{f"{name}_b1": functools.partial(e, new_tokens=n, concurrency=1)
                                      for name, e in engines.items()}, **b1}, prompts, 2)
        runs |= await taking_turns({**{f"{name}_c{c}": functools.partial(e, new_tokens=n, concurrency=c)
                                       for name, e in engines.items()}, **batched}, prompts, c)
    finally:
        for e in engines.values():
            e.close()
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "124m"], default="tiny")
    p.add_argument("--int8", action="store_true", help="B3: int8 paths at equal quality")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--peer-python", type=Path, default=PEERS / "bin/python")
    p.add_argument("--no-compile", action="store_true",
                   help="skip HF static cache + torch.compile")
    p.add_argument("--engine-compile", action="store_true",
                   help="also our engine with deploy.engine.compile=true and native=false (48-224 s start-up)")
    p.add_argument("--out", type=Path)
    p.add_argument("--llama-run", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.llama_run:
        return llama_main(args.llama_run)
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from serve_engine import fixed_prompts, hf_run, model_dir

    from lifecycle.hardware import decode_bytes_per_token, measure_read_bandwidth
    from lifecycle.models.load import load_model
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    suffix = ("-124m" if args.size == "124m" else "") + ("-int8" if args.int8 else "")
    out_path = args.out or ROOT / f"benchmarks/results/decode_peers{suffix}.json"
    skipped: dict[str, str] = {}
    llama_ok = args.peer_python.exists() and LLAMA_SRC is not None
    if not llama_ok:
        skipped["llama_cpp"] = f"no {args.peer_python} or llama.cpp source under {PEERS / 'src'}: make bench-peers"
    skipped["llama_cpp_b8"] = "llama-cpp-python has no batched generation"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        directory = model_dir(tmp)
        if args.size == "124m":
            directory = big_model(tmp, directory)
        model, tokenizer = load_model(directory)
        model.eval()
        n_params = sum(p.numel() for p in model.parameters())
        nbytes = decode_bytes_per_token(model)
        memory = {"bytes_per_token": nbytes, "read_GBps": [round(measure_read_bandwidth(cpu, nbytes) / 1e9, 2)]}
        prompts = fixed_prompts(args.prompts, len(tokenizer))
        pad, eos = tokenizer.pad_token_id or 0, tokenizer.eos_token_id
        ppl, warmup = {}, {}
        c, n = args.concurrency, args.new_tokens
        if not args.int8:
            hf_run(model, prompts[:2], 4, 1, pad, eos)
            b1 = {"hf_eager_b1": lambda p: hf_run(model, p, n, 1, pad, eos)}
            if llama_ok:
                try:
                    gguf = convert(directory, tmp / "f32.gguf", "f32", args.peer_python)
                    llama_part(gguf, args, prompts[:1], eos)  # fails here, not mid-run, if it cannot run
                    b1["llama_cpp_b1"] = lambda p: llama_part(gguf, args, p, eos)
                except RuntimeError as e:  # reported, not a win
                    skipped["llama_cpp"] = str(e)[:300]
            if not args.no_compile:
                compiled = hf_compiled(load_model(directory)[0].eval())
                started = time.perf_counter()
                hf_run(compiled, prompts, n, 1, pad, eos)  # every prompt length once: compiled before timing
                warmup["hf_compile_b1"] = round(time.perf_counter() - started, 1)
                b1["hf_compile_b1"] = lambda p: hf_run(compiled, p, n, 1, pad, eos)
            runs = asyncio.run(take_turns(directory, args, prompts, b1,
                                          {f"hf_eager_b{c}": lambda p: hf_run(model, p, n, c, pad, eos)}, warmup))
            reference = "hf_eager_b1"
        else:
            from lifecycle.models import int8
            from lifecycle.optimize.variant import save
            windows = heldout_windows(tokenizer, args.ppl_windows, 256)
            ppl["fp32"] = perplexity(model, windows)
            hf_run(model, prompts[:2], 4, 1, pad, eos)
            quantized = int8.quantize(load_model(directory)[0].eval())
            ours_dir = save(quantized, tokenizer, tmp / "ours-int8", "int8", [], {})
            ppl["ours_int8"] = perplexity(load_model(ours_dir)[0].eval(), windows)
            ppl["ours_int8_weight_only"] = perplexity(dequantized(load_model(directory)[0].eval(), quantized), windows)
            ao = torch.ao.quantization.quantize_dynamic(load_model(directory)[0].eval(), {torch.nn.Linear},
                                                        dtype=torch.qint8)
            ppl["torch_ao_int8"] = perplexity(ao, windows)
            hf_run(ao, prompts[:2], 4, 1, pad, eos)
            b1 = {"fp32_hf_eager_b1": lambda p: hf_run(model, p, n, 1, pad, eos),
                  "torch_ao_int8_hf_b1": lambda p: hf_run(ao, p, n, 1, pad, eos)}
            if llama_ok:
                try:
                    for outtype in ("f32", "q8_0"):
                        gguf = convert(directory, tmp / f"{outtype}.gguf", outtype, args.peer_python)
                        ppl[f"llama_cpp_{outtype}"] = run_llama(gguf, args.peer_python, args.threads,
                                                                ppl=windows)["ppl"]
                    b1["llama_cpp_q8_0_b1"] = lambda p: llama_part(gguf, args, p, eos)
                except RuntimeError as e:  # reported, not a win
                    skipped["llama_cpp_q8_0"] = str(e)[:300]
            runs = asyncio.run(take_turns(ours_dir, args, prompts, b1,
                                          {f"torch_ao_int8_hf_b{c}": lambda p: hf_run(ao, p, n, c, pad, eos)},
                                          warmup, prefix="ours_int8"))
            reference = "fp32_hf_eager_b1"
    memory["read_GBps"].append(round(measure_read_bandwidth(cpu, nbytes) / 1e9, 2))
    report(runs, ppl, warmup, skipped, reference, args, str(directory), n_params, out_path, memory)


def report(runs, ppl, warmup, skipped, reference, args, model, n_params, out_path, memory) -> None:
    ref = runs[reference]["outputs"]
    same = {name: sum(a == b for a, b in zip(run["outputs"], ref)) for name, run in runs.items()}
    tps = {name: run["tokens_per_s"] for name, run in runs.items()}
    print(f"\nmodel: {model} ({n_params / 1e6:.1f}M params); {args.prompts} prompts x {args.new_tokens} new tokens, "
          f"greedy, {args.threads} threads")
    print(f"{'run':<26}{'tokens/s':>10}{'TTFT p50 ms':>13}{'seconds':>9}{'= ' + reference:>24}")
    for name, run in runs.items():
        print(f"{name:<26}{run['tokens_per_s']:>10}{run['ttft_ms_p50']:>13}{run['seconds']:>9}"
              f"{same[name]:>18}/{len(ref)}")
    ratios = {}
    c = args.concurrency
    if not args.int8:
        for ours in ("engine", "engine_torch", "engine_compiled"):
            if f"{ours}_b1" not in tps:
                continue
            for peer in ("hf_eager_b1", "hf_compile_b1", "llama_cpp_b1"):
                if peer in tps:
                    ratios[f"{ours}_b1/{peer}"] = round(tps[f"{ours}_b1"] / tps[peer], 2)
            ratios[f"{ours}_c{c}/hf_eager_b{c}"] = round(tps[f"{ours}_c{c}"] / tps[f"hf_eager_b{c}"], 2)
            if "llama_cpp_b1" in tps:
                ratios[f"{ours}_c{c}/llama_cpp_b1"] = round(tps[f"{ours}_c{c}"] / tps["llama_cpp_b1"], 2)
        # A batch-1 step reads every fp32 weight once: tokens/s x bytes per token is the bandwidth each run used.
        ceiling = max(memory["read_GBps"])
        used = {name: round(tps[name] * memory["bytes_per_token"] / 1e9, 2) for name in tps if name.endswith("_b1")}
        needed = round(3 * tps["hf_eager_b1"] * memory["bytes_per_token"] / 1e9, 2)
        # At batch c a step reads the weights once for c tokens: a lower bound on the bandwidth (KV-cache reads and
        # prefill time left out), so "needed" above the measured read bandwidth proves a goal out of reach.
        used_c = {name: round(tps[name] / c * memory["bytes_per_token"] / 1e9, 2) for name in tps
                  if name.endswith(f"_c{c}") or name.endswith(f"_b{c}")}
        needed_c = round(3 * tps[f"hf_eager_b{c}"] / c * memory["bytes_per_token"] / 1e9, 2)
        memory |= {"used_GBps_b1": used, "needed_GBps_for_3x_hf_eager_b1": needed,
                   f"used_GBps_weights_only_c{c}": used_c, f"needed_GBps_for_3x_hf_eager_b{c}": needed_c}
        print(f"memory: {memory['bytes_per_token'] / 1e6:.1f} MB of weights per batch-1 token; read bandwidth "
              f"{ceiling} GB/s (best sum over a buffer that size, before and after the runs); used at batch 1 (GB/s): {used}; 3x HF "
              f"eager would need {needed} GB/s ({needed / ceiling:.2f}x the measured read bandwidth); at {c} rows "
              f"(weights once a step, a lower bound) used {used_c}, 3x HF b{c} would need at least {needed_c} GB/s "
              f"({needed_c / ceiling:.2f}x)")
    else:
        for ours in ("ours_int8", "ours_int8_torch"):
            ratios[f"{ours}_b1/torch_ao_int8_hf_b1"] = round(tps[f"{ours}_b1"] / tps["torch_ao_int8_hf_b1"], 2)
            ratios[f"{ours}_c{c}/torch_ao_int8_hf_b{c}"] = round(tps[f"{ours}_c{c}"] / tps[f"torch_ao_int8_hf_b{c}"],
                                                                  2)
            if "llama_cpp_q8_0_b1" in tps:
                ratios[f"{ours}_b1/llama_cpp_q8_0_b1"] = round(tps[f"{ours}_b1"] / tps["llama_cpp_q8_0_b1"], 2)
                ratios[f"{ours}_c{c}/llama_cpp_q8_0_b1"] = round(tps[f"{ours}_c{c}"] / tps["llama_cpp_q8_0_b1"], 2)
        base = {"ours_int8": "fp32", "ours_int8_weight_only": "fp32", "torch_ao_int8": "fp32",
                "llama_cpp_q8_0": "llama_cpp_f32"}
        ppl_change = {k: round(100 * (ppl[k] / ppl[b] - 1), 3) for k, b in base.items() if k in ppl and b in ppl}
        print("perplexity:", {k: round(v, 3) for k, v in ppl.items()}, "change %:", ppl_change)
        ratios["ppl_change_pct"] = ppl_change
    if warmup:
        print("compile warm-up s:", warmup)
    print("ratios:", ratios, "| skipped:", skipped)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({
        "model": model, "params": n_params, "date": time.strftime("%Y-%m-%d"), "prompts": args.prompts,
        "new_tokens": args.new_tokens, "threads": args.threads, "cpus": os.cpu_count(),
        "runs": {name: {k: v for k, v in run.items() if k != "outputs"} for name, run in runs.items()},
        f"identical_to_{reference}": same, "perplexity": ppl, "memory": memory, "warmup_s": warmup, "ratios": ratios,
        "skipped": skipped}, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
