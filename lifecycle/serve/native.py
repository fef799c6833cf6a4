"""The decode step in C (native_step.c): a whole step in one call, for float32 and int8 Llama-layout models on the CPU.

At batch 1 on a small model a torch step is mostly operator dispatch and OpenMP fork/join, not arithmetic: on the
11M default Llama the eager fast path takes ~3 ms a step, torch.compile's ~2 ms, while its bare matrix products take
~0.7 ms. This step runs in one OpenMP parallel region with each matrix read once by a register-blocked kernel.

Build: the C file is compiled on first use with the machine's C compiler (`$CC`, else `cc`; -O3 -march=native
-fopenmp, ~2 s) into `$LIFECYCLE_NATIVE_CACHE` (default ~/.cache/lifecycle/native), named by a digest of the source,
flags, compiler and CPU, so a rebuilt file never mixes with an old one and another machine recompiles. It links the
same libgomp torch loaded (one OpenMP thread pool in the process). No compiler, or a failed build, raises
`NativeUnavailable` with the reason; deploy.engine.native=auto then serves with the torch fast path and logs why.

Weights: the C step packs every matrix in panels of 32 output columns, (ceil(out / 32), in, 32) (`pack`), so a
tile of rows walks down each panel as one contiguous stream with its sums in registers (native_step.c's `product`).
That is its own copy, in huge pages where the system has them: int8 weights were repacked anyway (the torch.ao
modules keep fbgemm's packing for the HF forward), float32 ones are now held twice, the fast path's (which the HF
forward reads for long prompts, prompt log-probs and adapters) and the panels: a 120M Llama's served process holds
1,353 MB instead of 872. On an AMD EPYC (Zen 4, 2 threads) the panels took the 120M model's 8-row step from 26.6-27.5
to 17.8-19.3 ms and its batch-1 step from 18.9-19.2 to 15.9 ms; deploy.engine.native=false keeps one copy and the
torch fast path.

Numerics: float32 sums in index order per output column (torch's GEMM blocks them otherwise), so logits equal the HF
forward's to float rounding, and a row's logits are the same bits whatever shares its batch and at any thread count;
int8 weights are weight-only here (activations stay float32: x @ (q * scale)), which is closer to float32 than
torch.ao's dynamic int8 that the prefill (the HF forward) uses.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from lifecycle.serve import hugepages

SOURCE = Path(__file__).with_name("native_step.c")
HEADER = Path(__file__).parents[1] / "vectors.h"  # shared by every C file built here: on the include path, digested
CPUINFO = Path("/proc/cpuinfo")  # what the build's digest names the CPU by (_cpu)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-std=gnu11"]
if platform.machine().lower() in ("x86_64", "amd64"):
    FLAGS.append("-mprefer-vector-width=512")  # GCC keeps 256-bit vectors on AVX-512 CPUs otherwise

log = logging.getLogger(__name__)
_lock = threading.Lock()
_library: ctypes.CDLL | None = None


class NativeUnavailable(RuntimeError):
    """The C step cannot be built or loaded here; the message says why and what to do."""


PANEL = 32  # output columns per panel of a packed matrix (native_step.c's PANEL)


class Lin(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("in_", ctypes.c_int64),
                ("n", ctypes.c_int64)]


class Layer(ctypes.Structure):
    _fields_ = [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("q_norm", ctypes.c_void_p),
                ("k_norm", ctypes.c_void_p), ("qkv", Lin), ("o", Lin), ("gate", Lin), ("up", Lin), ("down", Lin)]


class Model(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int32), ("hidden", ctypes.c_int32), ("heads", ctypes.c_int32),
                ("kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("inter", ctypes.c_int32),
                ("vocab", ctypes.c_int32), ("int8", ctypes.c_int32), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("embed", ctypes.c_void_p), ("embed_rows", ctypes.c_int64),
                ("embed_s0", ctypes.c_int64), ("embed_s1", ctypes.c_int64), ("final_norm", ctypes.c_void_p),
                ("head", Lin), ("cos_t", ctypes.c_void_p), ("sin_t", ctypes.c_void_p), ("max_pos", ctypes.c_int64),
                ("layers", ctypes.POINTER(Layer))]


def cache_dir() -> Path:
    return Path(os.environ.get("LIFECYCLE_NATIVE_CACHE") or Path.home() / ".cache/lifecycle/native")


def library() -> ctypes.CDLL:
    """The compiled step, built on first use (see the module docstring); raises NativeUnavailable."""
    global _library
    with _lock:
        if _library is None:
            _library = _load(build())
        return _library


def _compiler() -> str:
    cc = os.environ.get("CC", "cc")
    path = shutil.which(cc)
    if path is None:
        raise NativeUnavailable(f"no C compiler: {cc!r} is not on PATH (install gcc, or set CC); "
                                "deploy.engine.native=false serves with the torch step without trying")
    return path


def _cpu() -> str:
    """What -march=native compiles for: the first CPU's model name and instruction-set flags. Both: a virtual
    machine's model name can be as vague as "AMD EPYC" across generations, and a library built for one CPU's
    instructions dies with SIGILL on a CPU without them (a home directory shared between machines)."""
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        lines = []
    found = {}
    for line in lines:
        key = line.split(":", 1)[0].strip()
        if key in ("model name", "flags", "Features", "CPU part") and key not in found:
            found[key] = line
    return "\n".join(found.values()) or platform.processor() or platform.machine()


def build(source: Path | None = None) -> Path:
    """`source` (a C file beside its Python module; default the step's) compiled as a shared library with FLAGS and
    the shared header, cached under a digest of both (see the module docstring)."""
    source = source or SOURCE
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"the C compiler {cc} does not run: {e}") from e
    text = source.read_bytes() + HEADER.read_bytes()
    digest = hashlib.sha256(b"\0".join([text, " ".join(FLAGS).encode(), version.encode(), _cpu().encode(),
                                        torch.__version__.encode()])).hexdigest()[:16]
    directory = cache_dir()
    target = directory / f"{source.stem}-{digest}.so"
    if target.is_file():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NativeUnavailable(f"cannot create the build directory {directory}: {e}; set LIFECYCLE_NATIVE_CACHE to "
                                "a writable directory") from e
    fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    command = [cc, *FLAGS, "-I", str(HEADER.parent), str(source), "-o", partial, "-lm"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise NativeUnavailable(f"compiling {source.name} failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
        os.replace(partial, target)  # atomic: a concurrent build of the same digest writes the same bytes
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"compiling {source.name} failed: {e}") from e
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    log.info("compiled %s into %s", source.name, target)
    return target


def _load(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))  # releases the GIL during calls
    except OSError as e:
        raise NativeUnavailable(f"cannot load {path}: {e}; delete it to rebuild") from e
    lib.lc_step.restype = ctypes.c_int
    lib.lc_step.argtypes = [ctypes.POINTER(Model), ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_int]
    lib.lc_decode_run.restype = ctypes.c_int
    lib.lc_decode_run.argtypes = [*lib.lc_step.argtypes, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p]
    lib.lc_sample.restype = ctypes.c_int64
    lib.lc_sample.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int64, ctypes.c_float,
                              ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p]
    lib.lc_sample_floats.restype = ctypes.c_int64
    lib.lc_sample_floats.argtypes = [ctypes.c_int64]
    lib.lc_uniform.restype = ctypes.c_double
    lib.lc_uniform.argtypes = [ctypes.c_uint64, ctypes.c_uint64]
    lib.lc_work_floats.restype = ctypes.c_int64
    lib.lc_work_floats.argtypes = [ctypes.POINTER(Model), ctypes.c_int, ctypes.c_int]
    lib.lc_prefill.restype = ctypes.c_int
    lib.lc_prefill.argtypes = [ctypes.POINTER(Model), ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int]
    lib.lc_prefill_floats.restype = ctypes.c_int64
    lib.lc_prefill_floats.argtypes = [ctypes.POINTER(Model), ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return lib


def unsupported(decoder) -> str | None:
    """Why the C step cannot run this FastDecoder's model; None when it can."""
    if decoder.embed.device.type != "cpu":
        return f"weights on {decoder.embed.device.type} (the C step runs on the CPU)"
    if decoder.dtype != torch.float32:
        return f"dtype {decoder.dtype} (the C step computes float32 and int8)"
    if decoder.heads % decoder.kv_heads:
        return "query heads not a multiple of kv heads"
    floats = {decoder.head_tensors is not None} | {t is not None for spec in decoder.layers
                                                   for t in spec["tensors"].values()}
    if len(floats) > 1:
        return "a mix of float32 and int8 linear layers (the C step takes one kind)"
    return None


def matrices(model) -> list[list]:
    """The modules of each matrix the C step packs, in order: the head, then per layer q/k/v (fused), o, gate, up,
    down (fastpath.projection_groups with gate and up apart: the C step pairs them panel by panel)."""
    groups = [[model.lm_head]]
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        groups += [[a.q_proj, a.k_proj, a.v_proj], [a.o_proj], [m.gate_proj], [m.up_proj], [m.down_proj]]
    return groups


def packed_shape(inputs: int, outputs: int) -> tuple[int, int, int]:
    """The panels of an (inputs, outputs) matrix: (ceil(outputs / PANEL), inputs, PANEL)."""
    return -(-outputs // PANEL), inputs, PANEL


def _packed_bytes(model, element_size: int) -> int:
    """Bytes of every packed matrix of `model` (matrices) in an arena, at `element_size` bytes a weight."""
    total = 0
    for group in matrices(model):
        shape = packed_shape(group[0].in_features, sum(module.out_features for module in group))
        total += hugepages.padded(shape[0] * shape[1] * shape[2] * element_size)
    return total


def pack(weight: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """`weight` (inputs, outputs), any strides, written into `into` (packed_shape): panel p holds columns
    p * PANEL .. p * PANEL + PANEL - 1 over all inputs, (inputs, PANEL) contiguous; the last panel's spare columns
    are zero. Returns `into`."""
    inputs, outputs = weight.shape
    full = outputs // PANEL
    if full:
        into[:full].copy_(weight[:, :full * PANEL].unflatten(1, (full, PANEL)).transpose(0, 1))
    if outputs % PANEL:
        into[full].zero_()
        into[full, :, :outputs % PANEL].copy_(weight[:, full * PANEL:])
    return into


class NativeStep:
    """The C step for one FastDecoder's model: the model's weights described once, called once per decode step."""

    def __init__(self, decoder, model):
        self.lib = library()
        self.inv_freq = decoder.inv_freq  # no reference to the decoder, which holds this object: no cycle
        config = model.config
        self.keep: list[torch.Tensor] = []  # every tensor the C side points at stays alive with this object
        self.int8 = decoder.int8
        # every matrix packed in panels (pack), in huge pages where the system has them (lifecycle.serve.hugepages)
        self.arena = hugepages.Arena(_packed_bytes(model, 1 if self.int8 else 4))
        head, *lins = [self._lin(group) for group in matrices(model)]
        layers = (Layer * len(decoder.layers))()
        for i, (spec, layer) in enumerate(zip(decoder.layers, layers)):
            layer.norm1, layer.norm2 = self._ptr(spec["norm1"]), self._ptr(spec["norm2"])
            layer.q_norm = self._ptr(spec["q_norm"]) if spec["q_norm"] is not None else None
            layer.k_norm = self._ptr(spec["k_norm"]) if spec["k_norm"] is not None else None
            layer.qkv, layer.o, layer.gate, layer.up, layer.down = lins[5 * i:5 * i + 5]
        self.layers = layers
        embed = decoder.embed.detach()
        self.keep.append(embed)
        self.vocab = model.lm_head.out_features
        self.runs_ahead = self.vocab <= embed.shape[0]  # lc_decode_run feeds each token back through the embedding
        self.model = Model(n_layers=len(decoder.layers), hidden=config.hidden_size, heads=decoder.heads,
                           kv_heads=decoder.kv_heads, head_dim=decoder.head_dim, inter=config.intermediate_size,
                           vocab=self.vocab, int8=int(self.int8), eps=decoder.eps, scale=decoder.scale,
                           embed=embed.data_ptr(), embed_rows=embed.shape[0], embed_s0=embed.stride(0),
                           embed_s1=embed.stride(1), final_norm=self._ptr(decoder.final_norm),
                           head=head, layers=layers)
        self._tables(max(config.max_position_embeddings, 1))
        self.work: dict[tuple[int, int], torch.Tensor] = {}  # scratch per (rows, threads)
        self.caches: tuple | None = None  # (key storage ids, keys array, values array)

    def _ptr(self, tensor: torch.Tensor) -> int:
        tensor = tensor.detach()
        if not tensor.is_contiguous():
            raise NativeUnavailable("a norm weight is not contiguous")
        self.keep.append(tensor)
        return tensor.data_ptr()

    def _lin(self, modules) -> Lin:
        """The modules' matrices side by side (outputs concatenated) packed in panels (pack), from the arena: float32
        as the modules hold them now (the fast path's fused storage), int8 as their integer values with one scale per
        output column (symmetric only)."""
        weights, scales, biases = [], [], []
        for module in modules:
            if not self.int8:
                weights.append(module.weight.detach().t())  # (in, out)
                biases.append(module.bias)
                continue
            q = module.weight()
            if q.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                if bool((q.q_per_channel_zero_points() != 0).any()):
                    raise NativeUnavailable("int8 weights with nonzero zero points (the C step is symmetric)")
                scale = q.q_per_channel_scales().float()
            else:
                if q.q_zero_point() != 0:
                    raise NativeUnavailable("int8 weights with a nonzero zero point (the C step is symmetric)")
                scale = torch.full((q.shape[0],), q.q_scale(), dtype=torch.float32)
            weights.append(q.int_repr().t())
            scales.append(scale)
            biases.append(module.bias())
        weight = weights[0] if len(weights) == 1 else torch.cat(weights, 1)
        packed = pack(weight, self.arena.take(packed_shape(*weight.shape), weight.dtype))
        scale = torch.cat(scales).contiguous() if scales else None
        bias = torch.cat([b.detach().float() for b in biases]).contiguous() if biases[0] is not None else None
        self.keep += [t for t in (packed, scale, bias) if t is not None]
        return Lin(w=packed.data_ptr(), scale=None if scale is None else scale.data_ptr(),
                   bias=None if bias is None else bias.data_ptr(), in_=weight.shape[0], n=weight.shape[1])

    def _tables(self, positions: int) -> None:
        """HF's cos and sign-folded sin for positions [0, positions), computed by the fast path's own function."""
        from lifecycle.serve.fastpath import rotation

        cos, sin = rotation(torch.arange(positions), self.inv_freq, torch.float32)
        self.cos, self.sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()
        self.model.cos_t, self.model.sin_t = self.cos.data_ptr(), self.sin.data_ptr()
        self.model.max_pos = positions

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        """Logits (rows, vocab) after feeding ids (rows,) at positions (rows,); keys and values go to column batch.t."""
        logits = torch.empty(ids.shape[0], self.vocab)
        self._run(self.lib.lc_step, ids, positions, batch, logits)
        return logits

    def run(self, ids: torch.Tensor, positions: torch.Tensor, batch, k: int, draws=None,
            logprobs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k steps in one call, each row fed its own previous token: the tokens (rows, k), -1 where a row's draw
        found nothing to draw (lc_decode_run), and with `logprobs` each token's log-prob under its step's logits
        (rows, k; else None). draws: None (every row greedy) or per row (temperature, top_k, top_p, seed, counter
        of its first token), temperature 0 for a greedy row. Columns batch.t .. batch.t + k - 1 must already be
        claimed (Batch.claim)."""
        rows = ids.shape[0]
        tokens = torch.empty(rows, k, dtype=torch.int64)
        settings, pointers = (), [None] * 5  # NULL settings: every row greedy
        if draws is not None:
            temperature, top_k, top_p, seed, counter = zip(*draws)
            settings = (torch.tensor(temperature, dtype=torch.float32), torch.tensor(top_k, dtype=torch.int64),
                        torch.tensor(top_p, dtype=torch.float32),
                        torch.tensor([s - (1 << 64) if s >= 1 << 63 else s for s in seed]),  # uint64 bits as int64
                        torch.tensor(counter, dtype=torch.int64))
            pointers = [t.data_ptr() for t in settings]  # `settings` holds the tensors until the call returns
        chosen = torch.empty(rows, k) if logprobs else None
        self._run(self.lib.lc_decode_run, ids, positions, batch, torch.empty(rows, self.vocab), k,
                  tokens.data_ptr(), *pointers, chosen.data_ptr() if logprobs else None)
        return tokens, chosen

    def prefill(self, prompts: list[list[int]], batch) -> torch.Tensor:
        """Run `prompts` at once into `batch`'s empty storage (row i: prompt i, left-padded to batch.t columns, its
        padding already masked in batch.bias): the logits (prompts, vocab) of each prompt's last token."""
        lengths = torch.tensor([len(p) for p in prompts])
        ids = torch.tensor([token for p in prompts for token in p], dtype=torch.int64)
        positions = torch.cat([torch.arange(len(p)) for p in prompts])
        rows = torch.repeat_interleave(torch.arange(len(prompts)), lengths)
        columns = positions + batch.t - lengths[rows]  # left-padded to batch.t columns
        out = lengths.cumsum(0) - 1  # each prompt's last token
        logits = torch.empty(len(prompts), self.vocab)
        layers = batch.layers
        keys, values = self._caches(layers)
        threads = torch.get_num_threads()
        work = torch.empty(self.lib.lc_prefill_floats(ctypes.byref(self.model), len(ids), len(prompts), threads))
        bias = self._bias(batch)
        while True:
            done = self.lib.lc_prefill(ctypes.byref(self.model), len(ids), ids.data_ptr(), positions.data_ptr(),
                                       rows.data_ptr(), columns.data_ptr(), batch.rows, bias.data_ptr(),
                                       layers[0].keys.shape[2], keys, values, len(prompts), out.data_ptr(),
                                       logits.data_ptr(), work.data_ptr(), threads)
            if done == 0:
                return logits
            self._failed(done, ids, int(positions.max()))

    def _caches(self, layers) -> tuple:
        """The C arrays of the layers' key and value pointers, made again only when the storage moved."""
        key = tuple(layer.keys.data_ptr() for layer in layers) + tuple(layer.values.data_ptr() for layer in layers)
        if self.caches is None or self.caches[0] != key:
            for layer in layers:
                if not (layer.keys.is_contiguous() and layer.values.is_contiguous()):
                    raise ValueError("the batch's key/value storage is not contiguous")
            keys = (ctypes.c_void_p * len(layers))(*(layer.keys.data_ptr() for layer in layers))
            values = (ctypes.c_void_p * len(layers))(*(layer.values.data_ptr() for layer in layers))
            self.caches = (key, keys, values)
        return self.caches[1], self.caches[2]

    @staticmethod
    def _bias(batch) -> torch.Tensor:
        bias = batch.bias
        if not bias.is_contiguous() or bias.dtype != torch.float32:
            raise ValueError("the batch's mask is not a contiguous float32 tensor")
        return bias

    def _failed(self, done: int, ids: torch.Tensor, last: int) -> None:
        """Raise for what a C entry point refused, or grow the rope table to reach position `last` (-1)."""
        if done == -2:
            raise ValueError(f"token ids {ids.tolist()} include one outside the embedding's "
                             f"{self.model.embed_rows} rows")
        if done == -3:
            raise ValueError(f"the head's {self.vocab} columns outnumber the embedding's {self.model.embed_rows} "
                             "rows: its tokens cannot all be fed back")
        if done != -1:
            raise ValueError(f"the C step refused its inputs (code {done})")
        # a position past the rope table: double it (positions are checked before anything is written)
        self._tables(max(2 * self.model.max_pos, last + 1))

    def _run(self, entry, ids: torch.Tensor, positions: torch.Tensor, batch, logits: torch.Tensor, *extra) -> None:
        rows = ids.shape[0]
        layers = batch.layers
        cap = layers[0].keys.shape[2]
        keys, values = self._caches(layers)
        threads = torch.get_num_threads()
        work = self.work.get((rows, threads))
        if work is None:
            work = self.work[rows, threads] = torch.empty(self.lib.lc_work_floats(ctypes.byref(self.model), rows,
                                                                                   threads))
        ids = ids.to(torch.int64).contiguous()  # the C side reads int64 (no copy when they already are)
        positions = positions.to(torch.int64).contiguous()
        bias = self._bias(batch)
        while True:
            done = entry(ctypes.byref(self.model), rows, ids.data_ptr(), positions.data_ptr(), bias.data_ptr(), cap,
                         batch.t, keys, values, logits.data_ptr(), work.data_ptr(), threads, *extra)
            if done == 0:
                return
            steps = extra[0] if extra else 1  # lc_decode_run's extra: (k, tokens, settings)
            self._failed(done, ids, int(positions.max()) + steps - 1)
