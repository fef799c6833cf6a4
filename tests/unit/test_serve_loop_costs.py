"""The decode loop's cheap paths give what the plain ones gave: numpy argmax, the Rust tokenizer's decode, the batched
event hand-off and the kept mask view of Batch.step_inputs."""
from __future__ import annotations

import asyncio

import pytest
import torch
from serve_models import tokenizer  # noqa: F401

from lifecycle.serve.batch import Batch
from lifecycle.serve.detok import Detokenizer, plain_decoder
from lifecycle.serve.engine import Outbox
from lifecycle.serve.protocol import Event
from lifecycle.serve.sampler import greedy_tokens


def test_greedy_tokens_equal_torch_argmax_ties_nan_and_other_dtypes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 1000, generator=g)
    logits[1, [3, 700]] = 50.0                     # a tie: the first maximum
    logits[2, [5, 9]] = float("nan")               # NaN counts as the maximum, the first one
    logits[3] = float("-inf")
    logits[4, 10] = float("inf")
    for x in (logits, logits[::2], logits.t().contiguous().t(), logits[:, :999]):
        assert greedy_tokens(x) == x.argmax(-1).tolist()
    half = logits.to(torch.bfloat16)               # numpy has no bfloat16: torch's argmax
    assert greedy_tokens(half) == half.argmax(-1).tolist()
    assert greedy_tokens(logits[:1]) == [int(logits[0].argmax())]


def test_plain_decoder_equals_the_tokenizers_decode(tokenizer):  # noqa: F811
    decode = plain_decoder(tokenizer)
    special = tokenizer.all_special_ids
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        ids = torch.randint(0, len(tokenizer), (int(torch.randint(0, 12, (1,), generator=g)),), generator=g).tolist()
        ids += special[:1] if _ % 3 == 0 else []
        assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
    # the streamed text is the whole text, fast decode or not
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. \u00e9\u00e8 \U0001F600 done")
    texts = {}
    for name, fn in (("fast", decode), ("plain", lambda i: tokenizer.decode(i, skip_special_tokens=True))):
        detok = Detokenizer(fn, ids[:3])
        texts[name] = "".join(detok.add(t) for t in ids[3:]) + detok.flush()
    assert texts["fast"] == texts["plain"] == tokenizer.decode(ids[3:], skip_special_tokens=True)


def test_plain_decoder_keeps_transformers_decode_where_it_does_more(tokenizer):  # noqa: F811
    calls = []

    class Cleaning(type(tokenizer)):
        def decode(self, ids, **kwargs):
            calls.append(ids)
            return super().decode(ids, **kwargs)

    tokenizer.__class__, original = Cleaning, tokenizer.__class__
    try:
        plain_decoder(tokenizer)([5, 6])
    finally:
        tokenizer.__class__ = original
    assert calls == [[5, 6]]


def test_outbox_delivers_in_order_one_wake_up_per_flush():
    async def main():
        loop = asyncio.get_running_loop()
        box, queues = Outbox(loop), [asyncio.Queue(), asyncio.Queue()]
        scheduled = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (scheduled.append(a), real(*a))[1]
        try:
            for i in range(8):
                box.post(queues[i % 2], Event(text=str(i)))
            await asyncio.sleep(0)
            assert queues[0].empty() and not scheduled       # nothing before a flush
            box.flush()
            box.flush()                                       # a delivery is pending: no second wake-up
            assert len(scheduled) == 1
            await asyncio.sleep(0)
            box.post(queues[0], Event(text="8"))
            box.flush()                                       # after a delivery ran: a new one
            await asyncio.sleep(0)
            assert len(scheduled) == 2
            return [[q.get_nowait().text for _ in range(q.qsize())] for q in queues]
        finally:
            loop.call_soon_threadsafe = real

    assert asyncio.run(main()) == [["0", "2", "4", "6", "8"], ["1", "3", "5", "7"]]


def test_outbox_of_a_closed_loop_drops_events_quietly():
    loop = asyncio.new_event_loop()
    box = Outbox(loop)
    loop.close()
    box.post(asyncio.Queue(), Event())
    box.flush()
    box.post(asyncio.Queue(), Event())
    box.flush()
    assert box.closed and not box.items


@pytest.mark.parametrize("rows", [1, 3])
def test_step_inputs_masks_equal_the_indexed_ones_across_growth_and_dtype(rows, monkeypatch):
    import lifecycle.serve.batch as batch_module

    monkeypatch.setattr(batch_module, "GROW", 4)
    valid = torch.ones(rows, 3, dtype=torch.bool)
    valid[0, 0] = False
    layers = [torch.zeros(rows, 2, 3, 4) for _ in range(2)]
    batch = Batch([batch_module._with_capacity(k, 7) for k in layers],
                  [batch_module._with_capacity(v, 7) for v in layers],
                  batch_module._with_capacity(valid, 7), valid.sum(1), 3)
    for step in range(12):
        dtype = torch.float32 if step < 8 else torch.bfloat16
        positions, mask = batch.step_inputs(dtype)
        t = batch.t
        assert torch.equal(positions, batch.positions[:, None])
        assert mask.shape == (rows, 1, 1, t + 1) and mask.dtype == dtype
        expected = torch.zeros(rows, t + 1, dtype=dtype).masked_fill(~batch.valid[:, :t + 1], torch.finfo(dtype).min)
        assert torch.equal(mask[:, 0, 0], expected)
        assert torch.equal(batch.bias[:, None, None, :t + 1], mask)
        assert bool(batch.valid[:, t].all()) and not bool(batch.valid[:, t + 1:].any())
        assert bool((batch.bias[:, t + 1:] == torch.finfo(dtype).min).all())  # later columns stay masked
        batch.advance()


def test_fanout_poll_returns_what_next_would_without_waiting():
    from lifecycle.serve.fanout import DONE, WAIT, Fanout
    from lifecycle.serve.protocol import Overloaded

    async def main():
        seen = []
        for take in ("poll", "next"):
            fan = Fanout(None, [None, None, None])
            for item in [(0, Event(text="a", token_ids=[1])), (1, DONE), (0, Event(text="b", finish_reason="stop")),
                         (0, DONE), (2, RuntimeError("bug"))]:
                fan.queue.put_nowait(item)
            got = [fan.poll() if take == "poll" else await fan.next() for _ in range(3)]
            got = [(i, e.text, e.finish_reason, e.error) for i, e in got]
            if take == "poll":
                assert fan.poll() is WAIT and fan.open == 1  # job 2 has not ended: next() would wait
            fan.queue.put_nowait((2, Overloaded("full")))
            with pytest.raises(Overloaded):
                fan.poll() if take == "poll" else await fan.next()
            fan.queue.put_nowait((2, DONE))
            assert (fan.poll() if take == "poll" else await fan.next()) is None
            seen.append(got)
        return seen

    polled, nexted = asyncio.run(main())
    assert polled == nexted == [(0, "a", None, None), (0, "b", "stop", None),
                                (2, "", "error", "engine failure: RuntimeError: bug")]
