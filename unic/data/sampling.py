"""Deterministic, resumable sampling of global batches."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

_SEED_MULT = 1_000_003


class GlobalBatchSampler(Sampler):
    """Yields this rank's slice of every global batch, as lists of ``(dataset index, sample seed)``.

    Epoch ``e`` is a permutation seeded by ``(seed, e)``; global batch ``s`` is its ``s``-th chunk of
    ``global_batch`` indices and rank ``r`` takes the ``r``-th contiguous part. The per-sample seed depends on
    (seed, epoch, position in the epoch) only, so a run is the same whatever the number of processes and
    data workers, and resuming at (epoch, step) replays exactly what an uninterrupted run would have seen.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if num_samples < global_batch:
            raise ValueError(f"the data set has {num_samples} samples, fewer than one global batch ({global_batch})")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size = rank, world_size
        self.local_batch = global_batch // world_size
        self.seed, self.shuffle = seed, shuffle
        self.steps_per_epoch = num_samples // global_batch
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, step_in_epoch: int = 0) -> None:
        self.epoch, self.start_step = epoch, step_in_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * _SEED_MULT + self.epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        base_seed = (self.seed * _SEED_MULT + self.epoch) * (self.num_samples + 1)
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.global_batch + self.rank * self.local_batch
            yield [(order[pos], (base_seed + pos) % (2**63)) for pos in range(start, start + self.local_batch)]


class ShardSampler(Sampler):
    """Contiguous shards for evaluation: concatenating the ranks' outputs restores dataset order."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        per_rank = -(-num_samples // world_size)
        self.indices = list(range(rank * per_rank, min((rank + 1) * per_rank, num_samples)))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
