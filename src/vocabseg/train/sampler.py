"""Data order as a pure function of (seed, epoch, position), so a resumed run sees the same batches.

Each epoch is a permutation drawn from ``torch.Generator().manual_seed(seed + epoch)``, padded to a
multiple of the world size (as ``DistributedSampler`` does); rank ``r`` takes ``perm[r::world]``. The
sampler yields ``(index, sample_seed)`` and datasets derive all their randomness (crops, flips,
colour jitter) from ``sample_seed``, a hash of (seed, epoch, index). Augmentation therefore does not
depend on which worker or rank loads a sample, and one process with batch ``2b`` sees exactly the
samples that two processes with batch ``b`` see together.

Streaming training sets (WebDataset tar shards, :class:`ShardStream`) have no index. Their order is a
pure function of (seed, epoch) at the granularity of shards (:func:`shard_plan`): each epoch permutes
the shards, rank ``r`` takes ``perm[r::world]`` and a rank's loader workers split its shards again.
Each rank's stream is endless (epoch after epoch, each rank on its own), so ranks never wait on each
other for data. The position saved in a checkpoint is the set of shards each rank has *opened* in its
current epoch (:class:`ShardBatchStream`), so **resume is exact to the shard, not to the sample**: a
resumed run continues with the shards not yet opened, and the samples of the opened shards that were
still unread or waiting in the shuffle buffer at the checkpoint are skipped (never repeated).
"""

from __future__ import annotations

import random
import warnings
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate, get_worker_info

from .model import TrainingError

__all__ = [
    "mix_seed",
    "ResumableDistributedSampler",
    "BatchStream",
    "build_loader",
    "StreamProgress",
    "ShardStream",
    "shard_plan",
    "ShardBatchStream",
    "build_batch_stream",
]

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

    @property
    def epoch_progress(self) -> float:
        """Epochs done, as a fraction (logged as ``epoch``)."""
        return self.position / self.per_epoch

    def state(self) -> dict[str, Any]:
        """This rank's position, for the checkpoint's trainer state (informative: the step decides it)."""
        return {"epoch": self.epoch, "batch_in_epoch": self.offset, "micro_batches": self.position}

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


# -- streaming (shard) datasets -------------------------------------------------------------------------


@dataclass
class StreamProgress:
    """How far one reader (a loader worker, or the main process) has gone through its shards.

    ``opened``: the shards it has started reading, in order; a resumed run treats them as done.
    ``skipped``: samples it dropped (unreadable image, empty caption, ...), by reason.
    """

    opened: list[int] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


@runtime_checkable
class ShardStream(Protocol):
    """A training set read as a stream of shards (an ``IterableDataset`` such as WebDataset tars).

    The trainer splits the shards across processes and loader workers with :func:`shard_plan` and
    asks the dataset for the samples of the shards a reader owns:

    - ``num_shards``; ``shard_fingerprint``: a string that changes when the shard list does (a resumed
      run refuses another shard set); ``shuffle_shards``: whether every epoch permutes the shards.
    - ``read_shards(seed, epoch, shards, progress)``: the samples of ``shards`` in reading order (with
      any buffer shuffle), each one's randomness derived from (seed, epoch, shard, position) only;
      ``progress`` (a :class:`StreamProgress`) is kept up to date as of the last sample yielded.
    - optionally ``collate_fn(samples)`` for the batches (default: ``default_collate``), and
      ``shard_sizes`` (samples per shard, or None) for the logged epoch fraction.
    """

    num_shards: int
    shard_fingerprint: str
    shuffle_shards: bool

    def read_shards(self, seed: int, epoch: int, shards: Sequence[int], progress: StreamProgress) -> Iterator[Any]: ...


def shard_plan(
    num_shards: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    num_workers: int = 1,
    done: Collection[int] = (),
    shuffle: bool = True,
) -> list[int]:
    """The shards one reader takes in ``epoch``, in reading order.

    Every process draws the same permutation from (seed, epoch); rank ``r`` owns ``perm[r::world_size]``;
    its loader workers split what is left of those once the ``done`` shards are removed, worker ``w``
    taking ``left[w::num_workers]``. Each shard is read by exactly one reader of the epoch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    if not 0 <= worker < max(num_workers, 1):
        raise ValueError(f"worker {worker} is outside {num_workers} loader worker(s)")
    if shuffle:
        order = torch.randperm(num_shards, generator=torch.Generator().manual_seed(mix_seed(seed, epoch))).tolist()
    else:
        order = list(range(num_shards))
    done = set(done)
    left = [s for s in order[rank::world_size] if s not in done]
    return left[worker :: max(num_workers, 1)]


class _ShardBatches(IterableDataset):
    """The loader side of :class:`ShardBatchStream`: in each worker, the whole batches of the worker's
    shards, each with the worker's :class:`StreamProgress` as of its last sample (so the main
    process knows what was read for the batches it has actually taken, whatever the prefetching)."""

    def __init__(self, dataset: Any, *, seed: int, rank: int, world_size: int, batch_size: int):
        self.dataset, self.seed, self.batch_size = dataset, seed, batch_size
        self.rank, self.world_size = rank, world_size
        self.collate = getattr(dataset, "collate_fn", None) or default_collate
        self.epoch = 0
        self.done: frozenset[int] = frozenset()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = shard_plan(
            self.dataset.num_shards,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=workers,
            done=self.done,
            shuffle=self.dataset.shuffle_shards,
        )
        progress = StreamProgress()
        samples: list[Any] = []

        def item(batch: Any) -> dict[str, Any]:
            return {
                "batch": batch,
                "worker": worker,
                "opened": list(progress.opened),
                "skipped": dict(progress.skipped),
            }

        for sample in self.dataset.read_shards(self.seed, self.epoch, shards, progress):
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield item(self.collate(samples))
                samples = []
        yield item(None)  # the final progress, with no batch: a worker's last partial batch is dropped (drop_last)


class ShardBatchStream:
    """Endless batches of a :class:`ShardStream` for one rank, epoch after epoch, with its position.

    The position is (epoch, shards opened in it, samples skipped): :meth:`state` for this rank,
    :meth:`gathered_state` for all ranks (a collective: every rank calls it at the same steps). A
    stream built with ``resume=`` a gathered state continues the epoch with this rank's unopened
    shards, so resume is exact to the shard, not to the sample (warned once); with another number of
    processes the ranks share what no old rank had opened at the earliest saved epoch. The number of
    loader workers may change between runs: the workers split the rank's shards left.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        seed: int,
        rank: int,
        world_size: int,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        start: int = 0,
        resume: Mapping[str, Any] | None = None,
    ):
        self.dataset, self.seed, self.rank, self.world_size = dataset, seed, rank, world_size
        self.batch_size = batch_size
        self.name = str(getattr(dataset, "name", type(dataset).__name__))
        if dataset.num_shards < world_size:  # checked on every rank, so no rank waits for another
            raise TrainingError(
                f"{self.name}: {dataset.num_shards} shard(s) cannot feed {world_size} processes; every process "
                "needs at least one shard per epoch. Write more, smaller shards (img2dataset "
                "--number_sample_per_shard) or train with fewer processes."
            )
        if num_workers > len(self.rank_shards(0)):
            warnings.warn(
                f"{self.name}: {num_workers} loader workers per process but only {len(self.rank_shards(0))} shard(s) "
                "per process: some workers stay idle. Use more shards or fewer workers (data.num_workers).",
                stacklevel=2,
            )
        self._source = _ShardBatches(dataset, seed=seed, rank=rank, world_size=world_size, batch_size=batch_size)
        self.loader = DataLoader(
            self._source,
            batch_size=None,  # the workers batch (see _ShardBatches)
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
            worker_init_fn=_seed_worker if num_workers > 0 else None,
            generator=torch.Generator(),
        )
        self.position = start
        self.epoch, self.batch_in_epoch = 0, 0
        self.done: set[int] = set()
        self._skipped_before: Counter[str] = Counter()  # epochs and runs before the current loader iterator
        self._worker_skipped: dict[int, Counter[str]] = {}
        self._it: Iterator[Any] | None = None
        self._fresh = True
        if resume is not None:
            self._restore(resume)

    # -- position -------------------------------------------------------------------------------------------
    def rank_shards(self, epoch: int) -> list[int]:
        """This rank's shards of ``epoch``, before the workers split them."""
        return shard_plan(
            self.dataset.num_shards,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
            shuffle=self.dataset.shuffle_shards,
        )

    @property
    def skipped(self) -> Counter[str]:
        """Samples this rank's readers skipped, by reason, since the start of training."""
        total = Counter(self._skipped_before)
        for counts in self._worker_skipped.values():
            total.update(counts)
        return total

    @property
    def epoch_progress(self) -> float:
        """Epochs done, as a fraction (logged as ``epoch``): samples taken over the rank's samples of the
        epoch when the dataset knows its ``shard_sizes``, else shards opened over the rank's shards
        (which runs ahead by what the shuffle buffer holds)."""
        shards = self.rank_shards(self.epoch)
        sizes = getattr(self.dataset, "shard_sizes", None)
        if sizes:
            total = sum(sizes[s] for s in shards)
            return self.epoch + min(self.batch_in_epoch * self.batch_size / max(total, 1), 1.0)
        return self.epoch + len(self.done) / max(len(shards), 1)

    def state(self) -> dict[str, Any]:
        """This rank's position: epoch, shards opened in it, batches taken, samples skipped."""
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "micro_batches": self.position,
            "opened": sorted(self.done),
            "skipped": dict(self.skipped),
        }

    def gathered_state(self) -> dict[str, Any]:
        """Every rank's :meth:`state` (an ``all_gather``: call it on all ranks at once) and the shard set."""
        mine = self.state()
        ranks: list[Any] = [mine]
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            ranks = [None] * self.world_size
            dist.all_gather_object(ranks, mine)
        return {
            "kind": "shards",
            "resume": "exact to the shard, not to the sample",
            "num_shards": int(self.dataset.num_shards),
            "fingerprint": str(self.dataset.shard_fingerprint),
            "world_size": self.world_size,
            "ranks": ranks,
        }

    def _restore(self, saved: Mapping[str, Any]) -> None:
        n, fingerprint = int(self.dataset.num_shards), str(self.dataset.shard_fingerprint)
        if saved.get("num_shards") != n or saved.get("fingerprint") != fingerprint:
            raise TrainingError(
                f"{self.name}: the checkpoint was written reading {saved.get('num_shards')} shard(s) (fingerprint "
                f"{saved.get('fingerprint')}), but the dataset now has {n} (fingerprint {fingerprint}); a run "
                "resumes on the same shard set. Restore the shard files, or start a new run in an empty folder."
            )
        ranks = list(saved["ranks"])
        if len(ranks) == self.world_size:
            mine = ranks[self.rank]
            self.epoch, self.batch_in_epoch = int(mine["epoch"]), int(mine["batch_in_epoch"])
            self.done = set(mine["opened"])
            self._skipped_before = Counter(mine.get("skipped", {}))
        else:  # another number of processes: share out what no old rank had opened at the earliest epoch
            self.epoch = min(int(r["epoch"]) for r in ranks)
            old_world = len(ranks)
            for old_rank, r in enumerate(ranks):
                if int(r["epoch"]) == self.epoch:
                    self.done.update(r["opened"])
                else:  # that rank had finished the epoch
                    self.done.update(
                        shard_plan(
                            n,
                            seed=self.seed,
                            epoch=self.epoch,
                            rank=old_rank,
                            world_size=old_world,
                            shuffle=self.dataset.shuffle_shards,
                        )
                    )
            if self.rank == 0:  # the totals stay counted once
                for r in ranks:
                    self._skipped_before.update(r.get("skipped", {}))
        left = [s for s in self.rank_shards(self.epoch) if s not in self.done]
        if self.done and left and self.rank == 0:
            warnings.warn(
                f"{self.name}: resuming a streaming dataset at a shard boundary: epoch {self.epoch} continues "
                f"with the shards not yet opened. Samples of the shards that were being read at the checkpoint "
                "(at most the shuffle buffer and one shard per loader worker) are skipped: resume is exact to "
                "the shard, not to the sample.",
                stacklevel=3,
            )

    # -- iteration ------------------------------------------------------------------------------------------
    def _start_epoch(self) -> None:
        self._source.epoch, self._source.done = self.epoch, frozenset(self.done)
        self._fresh = not self.done
        assert self.loader.generator is not None
        self.loader.generator.manual_seed(mix_seed(self.seed, self.rank, self.epoch, len(self.done)))
        self._it = iter(self.loader)

    def _end_epoch(self) -> None:
        self._skipped_before = self.skipped
        self._worker_skipped = {}
        self.epoch += 1
        self.batch_in_epoch = 0
        self.done = set()
        self._it = None

    def next(self) -> Any:
        while True:
            if self._it is None:
                self._start_epoch()
            item = next(self._it, None)  # type: ignore[call-overload]
            if item is None:  # the epoch is over
                empty = self._fresh and self.batch_in_epoch == 0
                self._end_epoch()
                if empty:
                    raise TrainingError(
                        f"{self.name}: an epoch of process {self.rank}'s {len(self.rank_shards(self.epoch - 1))} "
                        f"shard(s) gave no whole batch of {self.batch_size} (skipped: {dict(self.skipped)}); "
                        "check the shards, or lower the batch size."
                    )
                continue
            self.done.update(item["opened"])
            self._worker_skipped[int(item["worker"])] = Counter(item["skipped"])
            if item["batch"] is not None:  # else a worker's final progress
                break
        self.position += 1
        self.batch_in_epoch += 1
        sync = getattr(self.dataset, "skipped", None)
        if isinstance(sync, Counter):  # describe() of the dataset in this process shows the loader's counts
            sync.clear()
            sync.update(self.skipped)
        return item["batch"]

    def close(self) -> None:
        """Drop the loader iterator (and with it any worker processes)."""
        self._it = None


def build_batch_stream(
    dataset: Any,
    *,
    seed: int,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    start: int = 0,
    resume: Mapping[str, Any] | None = None,
) -> BatchStream | ShardBatchStream:
    """The trainer's batches: a :class:`ShardBatchStream` for a :class:`ShardStream`, else the indexed
    :class:`BatchStream` (whose position follows from ``start``, the micro-batches taken)."""
    if isinstance(dataset, ShardStream):
        return ShardBatchStream(
            dataset,
            seed=seed,
            rank=rank,
            world_size=world_size,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            start=start,
            resume=resume,
        )
    sampler = ResumableDistributedSampler(len(dataset), seed=seed, rank=rank, world_size=world_size)
    loader = build_loader(dataset, sampler, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
    return BatchStream(loader, sampler, seed=seed, start=start)
