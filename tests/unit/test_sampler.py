"""The training order resumes exactly and shards cleanly across ranks."""
from __future__ import annotations

from itertools import islice

from lifecycle.training.datamodule import ResumableSampler


def take(sampler, n):
    return list(islice(iter(sampler), n))


def test_resume_continues_the_stream():
    full = take(ResumableSampler(n=37, seed=3, batch_size=4, rank=0, world=1, start_batch=0), 4 * 30)
    resumed = take(ResumableSampler(n=37, seed=3, batch_size=4, rank=0, world=1, start_batch=12), 4 * 18)
    assert resumed == full[4 * 12:]


def test_each_epoch_is_a_permutation_and_epochs_differ():
    stream = take(ResumableSampler(n=50, seed=1, batch_size=5, rank=0, world=1, start_batch=0), 100)
    assert sorted(stream[:50]) == list(range(50)) and sorted(stream[50:]) == list(range(50))
    assert stream[:50] != stream[50:]


def test_ranks_partition_the_global_stream():
    single = take(ResumableSampler(n=40, seed=7, batch_size=8, rank=0, world=1, start_batch=0), 80)
    r0 = take(ResumableSampler(n=40, seed=7, batch_size=4, rank=0, world=2, start_batch=0), 40)
    r1 = take(ResumableSampler(n=40, seed=7, batch_size=4, rank=1, world=2, start_batch=0), 40)
    for m in range(10):  # micro-batch m of the 2-rank run = global batch m of the 1-rank run with batch 8
        assert r0[4 * m:4 * m + 4] + r1[4 * m:4 * m + 4] == single[8 * m:8 * m + 8]


def test_seed_changes_order():
    a = take(ResumableSampler(n=100, seed=1, batch_size=4, rank=0, world=1, start_batch=0), 20)
    b = take(ResumableSampler(n=100, seed=2, batch_size=4, rank=0, world=1, start_batch=0), 20)
    assert a != b
