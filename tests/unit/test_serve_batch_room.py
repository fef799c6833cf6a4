"""Batch storage: room reserved for what the running jobs may still write, left uninitialised, never read unwritten."""
from __future__ import annotations

import asyncio

import pytest
import torch
from serve_models import PROMPTS, ask, collect, run, serving, tokenizer, tokens  # noqa: F401
from test_serve_fastpath import nan_empty, sharp_llama_dir  # noqa: F401

from lifecycle.serve import batch as batch_module
from lifecycle.serve import scheduler as scheduler_module
from lifecycle.serve import served as served_module
from lifecycle.serve.batch import GROW
from lifecycle.serve.served import ROOM_MAX, ServedModel


@pytest.fixture
def poisoned(monkeypatch):
    """Uninitialised storage filled with NaN: a step that read a column nobody wrote would turn its logits to NaN."""
    monkeypatch.setattr(batch_module, "_empty", nan_empty)


SETTINGS = [dict(run_ahead_ms=0), dict(), dict(fast_decode=False)]
IDS = ["fast", "run-ahead", "hf"]


@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
def test_no_step_reads_a_column_nobody_wrote(sharp_llama_dir, settings, monkeypatch):
    """Jobs joining (a merge), leaving, and taking a finished job's row (adopt) over NaN-filled storage decode the
    tokens they decode over zeros: every column a step reads was written or zeroed first."""
    async def main():
        async with serving(sharp_llama_dir, **settings) as engine:
            joined, first = asyncio.Event(), []

            async def leader():  # the others join once it has 5 tokens (run ahead, one event may carry 16)
                async for event in engine.generate(ask(engine, PROMPTS[0], max_tokens=90)):
                    first.extend(event.token_ids)
                    if len(first) >= 5:
                        joined.set()
            others = await asyncio.gather(leader(), *(collect(engine, ask(engine, p, max_tokens=10 + 9 * i), joined)
                                                      for i, p in enumerate(PROMPTS[1:])))
            late = await collect(engine, ask(engine, PROMPTS[3], max_tokens=20))
            return [first, *(tokens(o) for o in others[1:]), tokens(late)]

    clean = run(main())
    monkeypatch.setattr(batch_module, "_empty", nan_empty)
    assert run(main()) == clean and sum(map(len, clean)) > 120


def test_a_long_generation_is_not_copied_while_it_runs_and_decodes_as_with_growth(sharp_llama_dir, monkeypatch,
                                                                                    poisoned):
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

    for settings in SETTINGS:
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
