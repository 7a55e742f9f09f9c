"""Batches that are a pure function of (seed, epoch), whatever the worker count or resume point.

Every epoch draws its permutation and one augmentation seed per batch from
``(seed, epoch)``; a dataset that implements ``__getitems__`` reseeds its
transform from that batch seed. So an epoch's images, order and augmentations
are the same with 0 or 4 DataLoader workers, after a resume from a checkpoint,
and on each torchrun rank's shard, without saving any RNG state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from roadshift.train.distributed import current_group
from roadshift.train.runtime import usable_cpus


class SeededBatch(NamedTuple):
    seed: int
    indices: list[int]


class EpochBatchSampler(Sampler):
    """Shuffled (or ordered) batches, sharded across torchrun ranks, reproducible per epoch."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        seeded_batches: bool,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.seed, self.seeded_batches = seed, seeded_batches
        self.rank, self.world_size = rank, world_size
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard(self, order: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return order
        per_rank = -(-len(order) // self.world_size)
        padded = np.resize(order, per_rank * self.world_size)  # repeat the head, as DDP does
        return padded[self.rank :: self.world_size]

    def _batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        order = self._shard(order)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.shuffle and len(batches) > 1 and len(batches[-1]) == 1:
            # A batch of one breaks BatchNorm in train mode; fold it into the one before.
            single = batches.pop()
            batches[-1] = np.concatenate([batches[-1], single])
        return batches

    def __iter__(self) -> Iterator[SeededBatch | list[int]]:
        batches = self._batches()
        seeds = np.random.default_rng([self.seed, self.epoch, 1]).integers(0, 2**31, len(batches))
        for batch_seed, batch in zip(seeds, batches, strict=True):
            indices = [int(i) for i in batch]
            yield SeededBatch(int(batch_seed), indices) if self.seeded_batches else indices

    def __len__(self) -> int:
        return len(self._batches())


def _already_collated(batch):
    """For datasets whose ``__getitems__`` returns a finished batch (``returns_batches``)."""
    return batch


def resolve_num_workers(setting: int | str) -> int:
    """``auto``: keep a GPU fed with up to 8 workers; on a CPU-only machine use workers only
    when there are cores to spare beyond the training threads (more than 4)."""
    if setting != "auto":
        return int(setting)
    cores = usable_cpus()
    if torch.cuda.is_available():
        return max(1, min(8, cores - 1))
    return 0 if cores <= 4 else min(4, cores // 4)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int | str = 0,
    shard: bool | None = None,
) -> DataLoader:
    """A loader over ``dataset``; training loaders (``shuffle``) are sharded under torchrun."""
    num_workers = resolve_num_workers(num_workers)
    group = current_group()
    sharded = shuffle if shard is None else shard
    sampler = EpochBatchSampler(
        len(dataset),
        batch_size,
        shuffle=shuffle,
        seed=seed,
        seeded_batches=hasattr(dataset, "__getitems__"),
        rank=group.rank if sharded else 0,
        world_size=group.world_size if sharded else 1,
    )
    batched = getattr(dataset, "returns_batches", False)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_already_collated if batched else None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    sampler = loader.batch_sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
