"""The KV cache of the jobs decoded together: one preallocated tensor per layer, rows left-padded to a shared column.

Every running row writes its next key/value at the same column `t`, so a decode step is one forward over all rows
with a per-row position and a padding mask; nothing is re-padded per step. A newcomer whose prompt fits before
column t takes over a finished job's row (adopt: that row alone rewritten); otherwise the storage is rebuilt (merge,
one copy of every row kept) when jobs join, when finished rows are over half as many as live ones, or when the
preallocated columns run out.

A rebuild reserves `room` columns past t, what the rows may still write (Scheduler._room), so a batch is not copied
again while its jobs run (it had been copied into storage 64 columns wider every 64 steps). The storage is left
uninitialised (_empty) except columns before t that hold no copied key: every step writes column t before it reads
it, so no column past t is read before it is written, and the room costs neither a zeroing pass nor, where the
allocator maps fresh memory for it, any memory until a step reaches it. The exception is the compiled torch step,
which attends over every column (masked): its batches are zeroed whole (`zeroed`).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

GROW = 64  # spare columns at least, allocated at each rebuild: a rebuild per 64 decode steps at most


class Clock:
    """The column a batch writes next, shared by the batch and its layers. Not the batch itself: batch and layers
    would then form a reference cycle, and a batch the scheduler drops (a merge replaces it) would keep its keys and
    values, hundreds of MB on a large batch, until the garbage collector's next full pass."""
    __slots__ = ("t",)

    def __init__(self, t: int):
        self.t = t


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values, (rows, kv_heads, capacity, head_dim), written at the batch's column `t`."""

    is_sliding = False

    def __init__(self, clock: Clock, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.clock, self.keys, self.values, self.is_initialized = clock, keys, values, True

    def lazy_initialization(self, key_states, value_states) -> None:
        """Storage is allocated by the batch, never lazily."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        t = self.clock.t
        self.keys[:, :, t] = key_states[:, :, 0]  # (rows, kv_heads, 1, head_dim) -> column t
        self.values[:, :, t] = value_states[:, :, 0]
        return self.keys[:, :, :t + 1], self.values[:, :, :t + 1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.clock.t + query_length, 0

    def get_seq_length(self) -> int:
        return self.clock.t

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class Batch(Cache):
    """Rows of running jobs: their KV storage, which columns hold real tokens, and each row's next position."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor,
                 positions: torch.Tensor, t: int, zeroed: bool = False):
        self._clock = Clock(t)
        self.zeroed = zeroed  # columns past t hold zeros, not garbage: for a step that reads them (module docstring)
        super().__init__(layers=[SlotLayer(self._clock, k, v) for k, v in zip(keys, values)])
        self.valid = valid            # (rows, capacity) bool: column holds a token of that row
        self.positions = positions    # (rows,) long: the position of each row's next token
        self.bias: torch.Tensor | None = None  # (rows, capacity) additive mask made from `valid`, kept across steps
        self._mask_of: torch.Tensor | None = None  # the bias that _mask views
        self._mask: torch.Tensor | None = None

    @property
    def t(self) -> int:
        """Columns in use; the next token of every row goes to column t."""
        return self._clock.t

    @t.setter
    def t(self, value: int) -> None:
        self._clock.t = value

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    @classmethod
    def from_prefill(cls, cache: Cache, valid: torch.Tensor) -> Batch:
        """Rows holding left-padded prompts' keys and values (a prefill's DynamicCache); valid: (rows, width).
        Zeros past the prompts (the caller's `zeroed` says whether copies of it must stay so)."""
        rows, width = valid.shape
        pad = ~valid[:, None, :, None]  # (rows, 1, width, 1)
        # Padding columns are masked, but a NaN there (a query that saw nothing) would still poison the sums.
        keys = [_with_capacity(layer.keys.masked_fill(pad, 0), width + GROW) for layer in cache.layers]
        values = [_with_capacity(layer.values.masked_fill(pad, 0), width + GROW) for layer in cache.layers]
        return cls(keys, values, _with_capacity(valid, width + GROW), valid.sum(1), width)

    @classmethod
    def from_packed(cls, cache: Cache, lengths: list[int], zeroed: bool = False) -> Batch:
        """Rows from a packed prefill's cache: prompts of `lengths` one after another in a single sequence
        ((1, kv_heads, sum(lengths), head_dim) per layer), each copied once into its own row, left-padded (the
        padding columns are the storage's zeros)."""
        first = cache.layers[0].keys
        batch = cls.empty(lengths, len(cache.layers), first.shape[1], first.shape[3], first.dtype, first.device, zeroed)
        width, start = batch.t, 0
        for row, n in enumerate(lengths):
            for layer, mine in zip(cache.layers, batch.layers):
                mine.keys[row, :, width - n:width] = layer.keys[0, :, start:start + n]
                mine.values[row, :, width - n:width] = layer.values[0, :, start:start + n]
            start += n
        return batch

    @classmethod
    def empty(cls, lengths: list[int], layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: torch.device | str = "cpu", zeroed: bool = False) -> Batch:
        """Storage for prompts of `lengths`, one row each, left-padded to the longest (their padding masked and
        zeroed), for a prefill that writes keys and values in place (NativeStep.prefill) or copies them in
        (from_packed)."""
        rows, width = len(lengths), max(lengths)
        valid = torch.zeros(rows, width + GROW, dtype=torch.bool, device=device)
        for row, n in enumerate(lengths):
            valid[row, width - n:width] = True
        shape, upto = (rows, kv_heads, width + GROW, head_dim), None if zeroed else width
        keys = [_storage(shape, dtype, device, upto) for _ in range(layers)]
        values = [_storage(shape, dtype, device, upto) for _ in range(layers)]
        batch = cls(keys, values, valid, torch.tensor(lengths, device=device), width, zeroed)
        batch.claim(0, dtype)  # the additive mask
        return batch

    def step_inputs(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(position_ids (rows, 1), additive attention mask (rows, 1, 1, t + 1)) for the next decode step."""
        self.claim(1, dtype)
        if self._mask_of is not self.bias:  # the (rows, 1, 1, capacity) view, made again only with a new bias
            self._mask, self._mask_of = self.bias[:, None, None, :], self.bias
        return self.positions.unsqueeze(1), self._mask[..., :self.t + 1]  # mask: (rows, 1, query=1, keys)

    def claim(self, k: int, dtype: torch.dtype) -> None:
        """Make columns t .. t + k - 1 real for every row (growing the storage if they are not there), in `valid`
        and in the additive mask `bias`, for the next k decode steps."""
        t = self.t
        if t + k > self.valid.shape[1]:
            self.grow(k)
        # narrow/fill_ and a kept bias: ~7 us a step where indexing with [:, t] and None took ~10
        self.valid.narrow(1, t, k).fill_(True)
        bias = self.bias
        if bias is None or bias.dtype != dtype:
            bias = self.bias = torch.zeros(self.valid.shape, dtype=dtype, device=self.valid.device)
            bias.masked_fill_(~self.valid, torch.finfo(dtype).min)  # additive: right for sdpa and eager alike
        else:  # only the claimed columns changed since the last step
            bias.narrow(1, t, k).zero_()

    def advance(self, k: int = 1) -> None:
        """After k decode steps: every row wrote columns t .. t + k - 1."""
        self.t += k
        self.positions += k

    def fits(self, src: Batch, src_row: int) -> bool:
        """Whether adopt(row, src, src_row) can place that prompt: it must end at column t, so start at or after 0."""
        return int(src.positions[src_row]) <= self.t

    def adopt(self, row: int, src: Batch, src_row: int) -> None:
        """Row `row` (a finished job's) takes over src's row `src_row`, a prefilled prompt of n tokens, ending at
        column t as if it had joined by merge: its keys and values copied into columns t - n .. t - 1, the columns
        before them zeroed and masked, its next position n. Only that row's storage is written, where a merge
        copies every row. Needs fits(src, src_row)."""
        n, t, end = int(src.positions[src_row]), self.t, src.t
        for mine, theirs in zip(self.layers, src.layers):
            for dst, source in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                dst[row, :, :t - n].zero_()  # masked, but a NaN left there would still poison the HF path's sums
                dst[row, :, t - n:t] = source[src_row, :, end - n:end]
        self.valid[row].zero_()
        self.valid[row, t - n:t] = True
        self.positions[row] = n
        if self.bias is not None:
            self.bias[row].fill_(torch.finfo(self.bias.dtype).min)
            self.bias[row, t - n:t] = 0

    def trimmable(self, rows: list[int]) -> bool:
        """Whether a merge of `rows` would be smaller than this batch: other rows dropped, or leading columns none
        of them uses."""
        return len(rows) < self.rows or _first_used(self, rows) > 0

    def grow(self, room: int = 0) -> None:
        """Copy the storage into one with `room` columns (GROW at least) past t: columns 0 .. t - 1 copied."""
        columns, t = self.t + max(GROW, room), self.t
        for layer in self.layers:
            layer.keys = _copy_into(layer.keys, columns, t, self.zeroed)
            layer.values = _copy_into(layer.values, columns, t, self.zeroed)
        self.valid = _with_capacity(self.valid, columns)
        self.bias = None


def merge(parts: list[tuple[Batch, list[int]]], room: int = 0) -> Batch | None:
    """A new batch of the chosen rows of each part, right-aligned at one column, leading empty columns dropped, with
    `room` columns (GROW at least) past it for the next steps."""
    parts = [(batch, rows) for batch, rows in parts if rows]
    if not parts:
        return None
    spans = [batch.t - _first_used(batch, rows) for batch, rows in parts]
    t = max(spans)
    n_rows = sum(len(rows) for _, rows in parts)
    first = parts[0][0]
    columns, zeroed = t + max(GROW, room), any(batch.zeroed for batch, _ in parts)
    keys = [_like(layer.keys, n_rows, columns, zeroed) for layer in first.layers]
    values = [_like(layer.values, n_rows, columns, zeroed) for layer in first.layers]
    valid = torch.zeros(n_rows, columns, dtype=torch.bool, device=first.valid.device)
    positions, row = [], 0
    for (batch, rows), span in zip(parts, spans):
        index = torch.tensor(rows, device=batch.valid.device)
        src, dst, n = slice(batch.t - span, batch.t), slice(t - span, t), len(rows)
        for layer, k, v in zip(batch.layers, keys, values):
            if not zeroed:  # masked, but a NaN left there would poison the HF path's sums
                k[row:row + n, :, :t - span].zero_()
                v[row:row + n, :, :t - span].zero_()
            k[row:row + n, :, dst] = layer.keys.index_select(0, index)[:, :, src]
            v[row:row + n, :, dst] = layer.values.index_select(0, index)[:, :, src]
        valid[row:row + n, dst] = batch.valid.index_select(0, index)[:, src]
        positions.append(batch.positions.index_select(0, index))
        row += n
    return Batch(keys, values, valid, torch.cat(positions), t, zeroed)


def _first_used(batch: Batch, rows: list[int]) -> int:
    """The first column any of `rows` uses (columns before it are padding for all of them)."""
    used = batch.valid[rows, :batch.t].any(0).nonzero()
    return int(used[0]) if len(used) else batch.t


def _like(tensor: torch.Tensor, rows: int, columns: int, zeroed: bool) -> torch.Tensor:
    """Storage shaped like `tensor` (rows, heads, columns, head_dim) with other rows/columns: zeros if `zeroed`,
    else uninitialised (the caller writes or zeroes every column before t)."""
    return _storage((rows, tensor.shape[1], columns, tensor.shape[3]), tensor.dtype, tensor.device,
                    None if zeroed else 0)


def _copy_into(tensor: torch.Tensor, columns: int, t: int, zeroed: bool) -> torch.Tensor:
    """Storage (rows, heads, columns, head_dim) holding `tensor`'s columns 0 .. t - 1 (zeros after if `zeroed`)."""
    out = _like(tensor, tensor.shape[0], columns, zeroed)
    out[:, :, :t] = tensor[:, :, :t]
    return out


def _storage(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, upto: int | None) -> torch.Tensor:
    """Key/value storage (rows, heads, columns, head_dim) whose columns before `upto` are zeros (None: all of them);
    the rest uninitialised (_empty)."""
    if upto is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    out = _empty(shape, dtype, device)
    out[:, :, :upto].zero_()
    return out


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Uninitialised memory; a module function, so tests can fill it with NaN to prove it is never read."""
    return torch.empty(shape, dtype=dtype, device=device)


def _with_capacity(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """`tensor` padded with zeros along its column dimension (2 for K/V, 1 for the valid mask) to `columns`."""
    dim = 2 if tensor.dim() == 4 else 1
    pad = list(tensor.shape)
    pad[dim] = columns - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_zeros(pad)], dim=dim)
