"""Data order: per-epoch permutations, rank sharding that matches one big batch, seeds, resume."""

from __future__ import annotations

import torch

from vocabseg.train.sampler import BatchStream, ResumableDistributedSampler, build_loader, mix_seed

from .toy import ToySegDataset


def test_ranks_together_take_the_single_process_batches():
    one = ResumableDistributedSampler(24, seed=3)
    two = [ResumableDistributedSampler(24, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for epoch in (0, 1):
        single = one.epoch_indices(epoch)
        shards = [s.epoch_indices(epoch) for s in two]
        for k in range(6):  # batch k: 2 per rank == 4 in one process
            assert sorted(shards[0][2 * k : 2 * k + 2] + shards[1][2 * k : 2 * k + 2]) == sorted(
                single[4 * k : 4 * k + 4]
            )
    assert one.epoch_indices(0) != one.epoch_indices(1) and sorted(one.epoch_indices(0)) == list(range(24))


def test_padding_and_sample_seeds():
    shards = [ResumableDistributedSampler(5, seed=0, rank=r, world_size=2) for r in (0, 1)]
    assert [len(s) for s in shards] == [3, 3]
    assert sorted(shards[0].epoch_indices(0) + shards[1].epoch_indices(0))[:5] == [0, 1, 2, 3, 4]
    s = ResumableDistributedSampler(5, seed=9)
    pairs = list(s)
    assert [seed for _, seed in pairs] == [mix_seed(9, 0, i) for i, _ in pairs]  # a function of (seed, epoch, index)
    assert len({seed for _, seed in pairs}) == 5 and all(0 <= seed < 2**63 for _, seed in pairs)
    assert mix_seed(9, 0, 1) != mix_seed(9, 1, 0)


def test_skip_resumes_mid_epoch():
    s = ResumableDistributedSampler(10, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, skip=4)
    assert list(s) == full[4:] and len(s) == 6


def test_stream_continues_across_epochs_from_any_position():
    data = ToySegDataset(n=10)

    def stream(start):
        sampler = ResumableDistributedSampler(len(data), seed=5)
        return BatchStream(
            build_loader(data, sampler, batch_size=3, num_workers=0, pin_memory=False), sampler, seed=5, start=start
        )

    s = stream(0)
    assert s.per_epoch == 3  # 10 samples, whole batches of 3
    batches = [s.next()["image"] for _ in range(8)]
    assert (s.epoch, s.offset) == (2, 2)
    resumed = stream(4)
    for expected in batches[4:]:
        assert torch.equal(resumed.next()["image"], expected)
    rng = torch.get_rng_state()
    stream(0).next()
    assert torch.equal(torch.get_rng_state(), rng)  # loading does not consume the global RNG
