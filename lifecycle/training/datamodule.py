"""Packed token shards as fixed-length windows, in an order that resumes exactly from any step."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from lifecycle.data.shards import open_split
from lifecycle.errors import DataError


class Windows(Dataset):
    """Window i = tokens[i*T : i*T + T + 1] as input_ids (T) and next-token labels (T)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.seq_len
        chunk = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))  # (T+1,)
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


class ResumableSampler(Sampler[int]):
    """An endless stream of window indices, a fresh seeded permutation each epoch.

    Rank r's k-th sample is global sample (k // B) * B * W + r * B + k % B, so the stream depends only on
    how many micro-batches were consumed: resuming at a step continues exactly where training stopped.
    """

    def __init__(self, n: int, seed: int, batch_size: int, rank: int, world: int, start_batch: int):
        self.n, self.seed, self.batch_size = n, seed, batch_size
        self.rank, self.world, self.start_batch = rank, world, start_batch

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        k = self.start_batch * self.batch_size
        epoch, perm = -1, None
        while True:
            m, j = divmod(k, self.batch_size)
            g = m * self.batch_size * self.world + self.rank * self.batch_size + j
            e, pos = divmod(g, self.n)
            if e != epoch:
                epoch, perm = e, self._permutation(e)
            yield int(perm[pos])
            k += 1


class PackedDataModule(LightningDataModule):
    """Train/val windows over the shards written by `lifecycle data`."""

    def __init__(self, dir: str, seq_len: int, batch_size: int, val_batches: int, num_workers: int, seed: int):
        super().__init__()
        self.dir, self.seq_len, self.batch_size = Path(dir), seq_len, batch_size
        self.val_batches, self.num_workers, self.seed = val_batches, num_workers, seed
        self.meta: dict = {}

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "train_set", None) is not None:
            return  # already set up (the stage reads meta before building the model)
        train, self.meta = open_split(self.dir, "train")
        val, _ = open_split(self.dir, "val")
        for name, tokens in (("train", train), ("val", val)):
            if len(tokens) < self.seq_len + 1:
                raise DataError(f"{self.dir}/{name}.bin holds {len(tokens)} tokens, fewer than one window of "
                                f"data.seq_len={self.seq_len}+1; lower data.seq_len or add documents")
        self.train_set, self.val_set = Windows(train, self.seq_len), Windows(val, self.seq_len)

    def _loader(self, dataset: Dataset, sampler) -> DataLoader:
        # A private generator: building iterators must not consume the global RNG (exact resume).
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed), persistent_workers=False)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        sampler = ResumableSampler(len(self.train_set), self.seed, self.batch_size, rank, world, start)
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        count = min(len(self.val_set), self.val_batches * self.batch_size * world)
        return self._loader(self.val_set, list(range(rank, count, world)))
