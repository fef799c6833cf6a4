"""Batch storage reserved ahead: lazily zeroed on the CPU, sized to what the running jobs may still write."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from serve_models import PROMPTS, ask, collect, run, serving, tokenizer, tokens  # noqa: F401
from test_serve_fastpath import sharp_llama_dir  # noqa: F401

from lifecycle.serve import batch as batch_module
from lifecycle.serve import scheduler as scheduler_module
from lifecycle.serve import served as served_module
from lifecycle.serve.batch import GROW
from lifecycle.serve.served import ROOM_MAX, ServedModel


def _rss() -> int:
    """This process's resident bytes now (not the peak)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_reserved_columns_take_no_memory_until_written():
    before = _rss()
    keys = batch_module._zeros((8, 12, 4096, 64), torch.float32, "cpu")  # 100 MB reserved
    assert _rss() - before < 8 << 20
    assert keys.is_contiguous() and not keys[:, :, :16].any()  # zeros where read
    keys[:, :, :32] = 1.0  # 32 columns of 96 (row, head) blocks: 2 pages each
    grown = _rss() - before
    assert 0.5 * (96 * 8192) <= grown < 8 << 20
    keys.fill_(2.0)
    assert _rss() - before > 90 << 20  # control: written, the whole of it is resident


def test_a_long_generation_is_not_copied_while_it_runs_and_decodes_as_with_growth(sharp_llama_dir, monkeypatch):
    """A job's batch reserves the columns its max_tokens may write: one copy (the join), none as it decodes. With the
    reserve forced down to GROW columns the storage grows twice (the copies the reserve saves); tokens the same."""
    copies = {"merge": 0, "grow": 0}
    real_merge, real_grow = scheduler_module.merge, batch_module.Batch.grow
    monkeypatch.setattr(scheduler_module, "merge", lambda *a: copies.__setitem__("merge", copies["merge"] + 1)
                        or real_merge(*a))
    monkeypatch.setattr(batch_module.Batch, "grow", lambda self, *a: copies.__setitem__("grow", copies["grow"] + 1)
                        or real_grow(self, *a))

    def generate(**settings):
        copies.update(merge=0, grow=0)

        async def main():
            async with serving(sharp_llama_dir, **settings) as engine:
                return tokens(await collect(engine, ask(engine, PROMPTS[2], max_tokens=100)))
        return run(main()), dict(copies)

    for settings in (dict(run_ahead_ms=0), dict(), dict(fast_decode=False)):
        reserved, copied = generate(**settings)
        assert len(reserved) == 100 and copied == {"merge": 1, "grow": 0}, settings
        monkeypatch.setattr(served_module, "ROOM_MAX", GROW)
        grown, copied = generate(**settings)
        monkeypatch.setattr(served_module, "ROOM_MAX", ROOM_MAX)
        assert grown == reserved and copied["merge"] == 1 and copied["grow"] >= 1, settings


def test_the_reserve_is_what_the_rows_may_write_within_bounds(tokenizer):  # noqa: F811
    from test_serve_fastpath import random_model
    served = ServedModel(random_model("llama"), tokenizer, "base", native=False)
    assert served.room("base", 3) == GROW
    assert served.room("base", 500) == 500
    assert served.room("base", 10 ** 6) == ROOM_MAX
    assert served.room("an-adapter", 500) == 500  # the HF forward reads only the columns up to t, too
