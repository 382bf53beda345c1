"""Data order as a pure function of (seed, epoch, position), so a resumed run sees the same batches.

Each epoch is a permutation drawn from ``torch.Generator().manual_seed(seed + epoch)``, padded to a
multiple of the world size (as ``DistributedSampler`` does); rank ``r`` takes ``perm[r::world]``. The
sampler yields ``(index, sample_seed)`` and datasets derive all their randomness (crops, flips,
colour jitter) from ``sample_seed``, a hash of (seed, epoch, index). Augmentation therefore does not
depend on which worker or rank loads a sample, and one process with batch ``2b`` sees exactly the
samples that two processes with batch ``b`` see together.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .model import TrainingError

__all__ = ["mix_seed", "ResumableDistributedSampler", "BatchStream", "build_loader"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64), stable across runs, processes and platforms."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


class ResumableDistributedSampler(Sampler[tuple[int, int]]):
    """Yields this rank's ``(index, sample_seed)`` pairs of an epoch, optionally skipping its first ones."""

    def __init__(self, num_samples: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if num_samples <= 0:
            raise TrainingError("The training dataset is empty.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of size {world_size}")
        self.num_samples = num_samples
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.per_rank = -(-num_samples // world_size)  # ceil
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate epoch ``epoch`` next, starting after this rank's first ``skip`` samples."""
        if not 0 <= skip <= self.per_rank:
            raise ValueError(f"skip={skip} is outside 0..{self.per_rank}")
        self.epoch, self.skip = epoch, skip

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's dataset indices of ``epoch``, in order (padded like ``DistributedSampler``)."""
        if self.shuffle:
            perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            perm = torch.arange(self.num_samples)
        total = self.per_rank * self.world_size
        if total > self.num_samples:
            reps = -(-total // self.num_samples)
            perm = perm.repeat(reps)[:total]
        return perm[self.rank :: self.world_size].tolist()

    def sample_seed(self, epoch: int, index: int) -> int:
        return mix_seed(self.seed, epoch, index)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in self.epoch_indices(epoch)[self.skip :]:
            yield index, self.sample_seed(epoch, index)

    def __len__(self) -> int:
        return self.per_rank - self.skip


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs in a loader worker from the seed torch derived for it."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(
    dataset: Dataset, sampler: ResumableDistributedSampler, *, batch_size: int, num_workers: int, pin_memory: bool
) -> DataLoader:
    """A DataLoader over ``sampler`` with whole batches only and its own generator (see :class:`BatchStream`).

    A dataset whose samples do not stack (a variable number of masks per image) gives its own
    ``collate_fn`` attribute, which the loader uses instead of the default stacking.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=getattr(dataset, "collate_fn", None),
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,
        persistent_workers=False,
        pin_memory=pin_memory,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=torch.Generator(),  # loader iterators draw worker seeds from it, not from the global RNG
    )


class BatchStream:
    """Endless micro-batches across epochs, starting at any position; tracks where it is.

    ``position`` counts the micro-batches this rank has taken since the start of training; epoch and
    offset follow from it, so a resumed run restarts exactly where the checkpoint left off.
    """

    def __init__(self, loader: DataLoader, sampler: ResumableDistributedSampler, *, seed: int, start: int = 0):
        self.loader, self.sampler, self.seed = loader, sampler, seed
        self.batch_size = int(loader.batch_size or 1)
        self.per_epoch = sampler.per_rank // self.batch_size
        if self.per_epoch == 0:
            raise TrainingError(
                f"An epoch has no whole batch: {sampler.num_samples} samples over {sampler.world_size} "
                f"process(es) give {sampler.per_rank} each, fewer than the batch size {self.batch_size}."
            )
        self.position = start
        self._it: Iterator[Any] | None = None

    @property
    def epoch(self) -> int:
        return self.position // self.per_epoch

    @property
    def offset(self) -> int:
        """Micro-batches already taken in the current epoch."""
        return self.position % self.per_epoch

    def _start_epoch(self) -> None:
        self.sampler.set_epoch(self.epoch, skip=self.offset * self.batch_size)
        assert self.loader.generator is not None
        self.loader.generator.manual_seed(mix_seed(self.seed, self.epoch, self.offset))  # worker seeds
        self._it = iter(self.loader)

    def next(self) -> Any:
        if self._it is None:
            self._start_epoch()
        try:
            batch = next(self._it)  # type: ignore[arg-type]
        except StopIteration:
            self._it = None
            self._start_epoch()
            batch = next(self._it)  # type: ignore[arg-type]
        self.position += 1
        return batch

    def close(self) -> None:
        """Drop the loader iterator (and with it any worker processes)."""
        self._it = None
