"""Streaming WebDataset caption shards: the split across ranks and loader workers, skip-and-count of
broken samples, layout errors, and the trainer's shard-boundary resume (after SIGKILL, with DDP)."""

from __future__ import annotations

import gc
import io
import json
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import webdataset as wds
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from vocabseg.data.captions import CaptionShards, MultiCrop, caption_shards_train, expand_shards
from vocabseg.data.train import TrainTransforms
from vocabseg.errors import DatasetLayoutError
from vocabseg.train import DataConfig, get_recipe, train
from vocabseg.train.checkpoint import checkpoint_name
from vocabseg.train.log import read_metrics
from vocabseg.train.model import TrainingError
from vocabseg.train.sampler import ShardBatchStream, ShardStream, shard_plan
from vocabseg.train.tasks import build_training

from .caption_stream_setup import (
    PER_SHARD,
    ToyCaptionModel,
    buffered_setup,
    caption_recipe,
    colour,
    jpeg,
    write_shards,
)
from .harness import _ddp_worker, check_sigkill_resume, finish_run, free_port, kill_after, start_run

SETUP = str(Path(__file__).with_name("caption_stream_setup.py"))
CROP = MultiCrop(global_size=16, local_size=8, num_local=2)


def _in_own_process(test: str) -> bool:
    """Run ``test`` in a fresh pytest process and report whether this call should stop there.

    The SIGKILL tests below kill children of the process they run in; in full xdist runs a worker that
    had run this file's in-process loader tests sometimes died with them (cause not found), so they run
    in a process of their own. Returns False inside that process (run the body)."""
    if os.environ.get("VOCABSEG_ISOLATED_TEST") == test:
        return False
    env = {**os.environ, "VOCABSEG_ISOLATED_TEST": test}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", f"{__file__}::{test}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return True


@pytest.fixture(autouse=True)
def _end_loader_workers():
    """Loader iterators of endless streams a test dropped are collected (and their worker processes,
    forked from the test process, shut down) before the next test, which may SIGKILL children of its own."""
    yield
    gc.collect()


def sample_id(caption: str) -> tuple[int, int]:
    """(shard, index) of a ``"shard s sample i"`` caption."""
    words = caption.split()
    return int(words[1]), int(words[3])


def read_all(ds, rank: int, world: int, workers: int, epoch: int = 0) -> list[str]:
    ds.set_rank(rank, world)
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    return [s["caption"] for s in loader]


def stream(ds, *, rank=0, world=1, workers=0, batch=1, resume=None, seed=0) -> ShardBatchStream:
    return ShardBatchStream(
        ds,
        seed=seed,
        rank=rank,
        world_size=world,
        batch_size=batch,
        num_workers=workers,
        pin_memory=False,
        resume=resume,
    )


def take_epoch(s: ShardBatchStream) -> list[str]:
    """The rest of the stream's current epoch (the first batch of the next epoch is read and dropped)."""
    epoch, captions = s.epoch, []
    while True:
        batch = s.next()
        if s.epoch != epoch:
            return captions
        captions += batch["caption"]


@pytest.fixture
def shard_dir(tmp_path, monkeypatch):
    folder = tmp_path / "shards"
    write_shards(folder, num_shards=6, per_shard=5)
    monkeypatch.setenv("CAPTION_SHARDS_DIR", str(folder))
    return folder


def shard_set(folder: Path, buffer: int = 4) -> CaptionShards:
    return CaptionShards(expand_shards(folder), CROP, shuffle_buffer=buffer)


# -- the split ------------------------------------------------------------------------------------------------


def test_shard_plan_gives_every_shard_to_one_reader_per_epoch():
    for epoch in (0, 1):
        readers = [
            shard_plan(7, seed=3, epoch=epoch, rank=r, world_size=2, worker=w, num_workers=2)
            for r in (0, 1)
            for w in (0, 1)
        ]
        assert sorted(s for shards in readers for s in shards) == list(range(7))
        left = [shard_plan(7, seed=3, epoch=epoch, rank=r, world_size=2, worker=w, num_workers=2, done={1, 4})
                for r in (0, 1) for w in (0, 1)]  # fmt: skip
        assert sorted(s for shards in left for s in shards) == [0, 2, 3, 5, 6]
    orders = {tuple(shard_plan(7, seed=3, epoch=e)) for e in range(4)}
    assert len(orders) > 1  # each epoch permutes the shards
    assert shard_plan(7, seed=3, epoch=2) == shard_plan(7, seed=3, epoch=2)
    assert shard_plan(7, seed=3, epoch=2, shuffle=False) == list(range(7))


def test_two_ranks_and_two_workers_read_every_sample_once_shuffled(shard_dir):
    ds = shard_set(shard_dir)
    assert isinstance(ds, ShardStream) and ds.num_shards == 6
    per_rank = [read_all(ds, rank, 2, workers=2) for rank in (0, 1)]
    everything = [sample_id(c) for c in per_rank[0] + per_rank[1]]
    assert sorted(everything) == [(s, i) for s in range(6) for i in range(5)]  # none lost, none twice
    for rank in (0, 1):  # a rank reads the shards its plan gives it
        assert {sample_id(c)[0] for c in per_rank[rank]} == set(shard_plan(6, seed=0, epoch=0, rank=rank, world_size=2))
    assert per_rank[0] == read_all(ds, 0, 2, workers=2)  # deterministic
    assert per_rank[0] != read_all(ds, 0, 2, workers=2, epoch=1)
    in_order = [sample_id(c) for c in read_all(shard_set(shard_dir, buffer=0), 0, 1, workers=0)]
    shuffled = [sample_id(c) for c in read_all(shard_set(shard_dir, buffer=8), 0, 1, workers=0)]
    assert sorted(in_order) == sorted(shuffled) and in_order != shuffled
    assert all(in_order[k][0] == in_order[5 * (k // 5)][0] for k in range(30))  # no buffer: shard after shard


def test_trainer_stream_over_two_ranks_and_two_workers_loses_nothing(shard_dir):
    ds = shard_set(shard_dir)
    seen = []
    for rank in (0, 1):
        s = stream(ds, rank=rank, world=2, workers=2)
        seen += take_epoch(s)
        s.close()
    assert sorted(sample_id(c) for c in seen) == [(s, i) for s in range(6) for i in range(5)]


def test_sample_views_depend_on_seed_epoch_and_position_only(shard_dir):
    ds = shard_set(shard_dir)
    ds.set_rank(0, 1)

    def views(workers: int, world: int, epoch: int = 0) -> dict[str, torch.Tensor]:
        out = {}
        for rank in range(world):
            ds.set_rank(rank, world)
            ds.set_epoch(epoch)
            out.update({s["caption"]: s["local_crops"] for s in DataLoader(ds, batch_size=None, num_workers=workers)})
        return out

    one, split = views(0, 1), views(2, 2)
    assert sorted(one) == sorted(split)
    assert all(torch.equal(one[c], split[c]) for c in one)  # the same crops whoever reads the sample
    later = views(0, 1, epoch=1)
    assert not any(torch.equal(one[c], later[c]) for c in one)  # new crops every epoch


# -- broken samples and layouts ---------------------------------------------------------------------------------


def write_tar(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def test_broken_images_and_empty_captions_are_skipped_and_counted(tmp_path):
    good = jpeg(colour(0))
    write_tar(
        tmp_path / "00000.tar", [{"__key__": f"g{i}", "jpg": good, "txt": f"shard 0 sample {i}"} for i in range(4)]
    )
    write_tar(
        tmp_path / "00001.tar",
        [
            {"__key__": "a", "jpg": b"\xff\xd8\xff\xe0 broken bytes", "txt": "shard 1 sample 0"},
            {"__key__": "b", "jpg": good, "txt": "  \n"},
            {"__key__": "c", "jpg": good, "json": {"status": "success"}},  # no caption member
            {"__key__": "d", "txt": "shard 1 sample 3"},  # no image member
            {"__key__": "e", "jpg": good[: len(good) // 2], "txt": "shard 1 sample 4"},  # truncated JPEG
            {"__key__": "f", "jpg": good, "txt": "shard 1 sample 5"},
        ],
    )
    whole = write_tar(
        tmp_path / "whole.tar", [{"__key__": f"h{i}", "jpg": good, "txt": f"shard 2 sample {i}"} for i in range(4)]
    )
    with tarfile.open(whole) as tar:
        cut = tar.getmembers()[4].offset_data + 100  # inside the third sample's image
    (tmp_path / "00002.tar").write_bytes(whole.read_bytes()[:cut])  # a shard cut off mid-way (an interrupted copy)
    whole.unlink()
    ds = CaptionShards(expand_shards(tmp_path), CROP, shuffle_buffer=3, shuffle_shards=False)
    ds.set_rank(0, 1)
    with pytest.warns(UserWarning, match=r"00002\.tar: reading stopped early"):
        captions = [s["caption"] for s in ds]
    assert sorted(captions) == sorted(
        [f"shard 0 sample {i}" for i in range(4)] + ["shard 1 sample 5", "shard 2 sample 0", "shard 2 sample 1"]
    )
    expected = {"broken_image": 2, "empty_caption": 1, "no_caption": 1, "no_image": 1, "broken_shard": 1}
    assert ds.skipped == expected
    assert ds.describe()["skipped"] == expected
    # the trainer's stream, with 2 loader workers (worker 0: shards 0 and 2, worker 1: shard 1): the
    # workers' counts reach the main process (the first batch of the next epoch comes from good shard 0)
    ds2 = CaptionShards(expand_shards(tmp_path), CROP, shuffle_buffer=3, shuffle_shards=False)
    s = stream(ds2, workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = take_epoch(s)
    assert sorted(got) == sorted(captions)
    assert s.skipped == expected and ds2.describe()["skipped"] == expected
    s.close()


def test_layout_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"No \.tar shards in .*--output_format webdataset"):
        expand_shards(tmp_path)
    with pytest.raises(DatasetLayoutError, match="No shard matches"):
        expand_shards("*.tar", tmp_path)
    with pytest.raises(DatasetLayoutError, match=r"1 of 1 shard.*00007\.tar: missing"):
        CaptionShards(expand_shards("{00007..00007}.tar", tmp_path), CROP)
    (tmp_path / "notes.tar").write_text("this is not a tar file" * 40)
    with pytest.raises(DatasetLayoutError, match=r"notes\.tar: not a tar file"):
        CaptionShards([str(tmp_path / "notes.tar")], CROP)
    (tmp_path / "notes.tar").unlink()
    write_tar(tmp_path / "00000.tar", [{"__key__": f"k{i}", "jpg": jpeg(colour(0))} for i in range(3)])
    ds = CaptionShards(expand_shards(tmp_path), CROP)
    ds.set_rank(0, 1)
    with pytest.raises(DatasetLayoutError, match=r"00000\.tar: no sample .* \.txt caption.*--caption_col"):
        list(ds)
    # folder layout inside the tar (images/ and captions/ apart): no key has both
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in (("images/k.jpg", jpeg(colour(0))), ("captions/k.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DatasetLayoutError, match="no sample"):
        list(CaptionShards([str(tmp_path / "00000.tar")], CROP))


def test_shards_entry_reads_a_pattern_relative_to_the_data_root(shard_dir):
    config = DataConfig(dataset="caption_shards", crop=16, scale=(0.4, 1.0), options={"shards": "{00001..00003}.tar"})
    ds = caption_shards_train(config, shard_dir, TrainTransforms(crop=16, scale=(0.4, 1.0)))
    assert [Path(u).name for u in ds.urls] == ["00001.tar", "00002.tar", "00003.tar"]
    config = DataConfig(dataset="caption_shards", crop=16, scale=(0.4, 1.0))
    ds = caption_shards_train(config, shard_dir / "00004.tar", TrainTransforms(16, scale=(0.4, 1.0)))
    assert ds.num_shards == 1  # --data-root may name the shards itself
    bad = DataConfig(dataset="caption_shards", crop=16, options={"shuffle_buffer": "big"})
    with pytest.raises(Exception, match="shuffle_buffer"):
        caption_shards_train(bad, shard_dir, TrainTransforms(16, scale=(0.4, 1.0)))


def test_img2dataset_stats_give_the_sample_count_and_the_epoch_fraction(shard_dir):
    ds = shard_set(shard_dir, buffer=8)
    assert ds.shard_sizes is None and ds.describe()["estimated_samples"] is None
    s = stream(ds, batch=2)
    s.next()
    assert s.epoch_progress == pytest.approx(2 / 6)  # without sizes: shards opened (a buffer of 8 spans two)
    for k in range(6):
        (shard_dir / f"{k:05d}_stats.json").write_text(json.dumps({"count": 5, "successes": 5, "failed": 0}))
    ds = shard_set(shard_dir, buffer=8)
    assert ds.shard_sizes == [5] * 6 and ds.describe()["estimated_samples"] == 30
    s = stream(ds, batch=2)
    for _ in range(3):
        s.next()
    assert s.epoch_progress == pytest.approx(6 / 30)


# -- resume at a shard boundary ---------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_at_the_next_shard_boundary(shard_dir, workers):
    ds = shard_set(shard_dir, buffer=4)
    first = stream(ds, workers=workers)
    before = [first.next()["caption"][0] for _ in range(7)]
    state = first.gathered_state()
    first.close()
    opened = set(state["ranks"][0]["opened"])
    assert {sample_id(c)[0] for c in before} <= opened and len(opened) < 6
    with pytest.warns(UserWarning, match="shard boundary"):
        resumed = stream(shard_set(shard_dir, buffer=4), workers=workers, resume=state)
    after = take_epoch(resumed)
    assert not {sample_id(c)[0] for c in after} & opened  # nothing of an opened shard is read again
    left = sorted(set(range(6)) - opened)
    assert sorted(sample_id(c) for c in after) == [(s, i) for s in left for i in range(5)]  # nor skipped
    assert resumed.epoch == 1
    resumed.close()


def test_resume_with_another_number_of_processes_reads_what_no_rank_opened(shard_dir):
    ds = shard_set(shard_dir, buffer=0)
    ranks = [stream(ds, rank=r, world=2) for r in (0, 1)]
    for r, n in ((0, 3), (1, 1)):
        for _ in range(n):
            ranks[r].next()
    state = {**ranks[0].gathered_state(), "ranks": [s.state() for s in ranks], "world_size": 2}
    opened = set(state["ranks"][0]["opened"]) | set(state["ranks"][1]["opened"])
    with pytest.warns(UserWarning, match="shard boundary"):
        single = stream(shard_set(shard_dir, buffer=0), resume=state)
    after = take_epoch(single)
    assert {sample_id(c)[0] for c in after} == set(range(6)) - opened


def test_resume_refuses_another_shard_set(shard_dir):
    ds = shard_set(shard_dir)
    state = stream(ds).gathered_state()
    fewer = CaptionShards(expand_shards("{00000..00004}.tar", shard_dir), CROP)
    with pytest.raises(TrainingError, match="same shard set"):
        stream(fewer, resume=state)
    with pytest.raises(TrainingError, match="6 shard.*cannot feed 8 processes"):
        stream(ds, rank=0, world=8)


# -- the trainer ------------------------------------------------------------------------------------------------


def test_trainer_learns_from_shards_and_checkpoints_the_stream(shard_dir, tmp_path):
    torch.set_num_threads(1)
    ds = CaptionShards(expand_shards(shard_dir), CROP, shuffle_buffer=4)
    recipe = caption_recipe(max_iters=150, checkpoint_every=50, log_every=5, batch_size=4)
    result = train(recipe, ToyCaptionModel(), ds, tmp_path / "run", progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses  # it learns the shard colours
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    stream_state = state["data_stream"]
    assert stream_state["num_shards"] == 6 and stream_state["world_size"] == 1
    # 30 samples an epoch give 7 whole batches of 4 (a worker's last partial batch is dropped)
    assert (state["epoch"], state["batch_in_epoch"]) == (150 // 7, 150 % 7)
    assert (stream_state["ranks"][0]["epoch"], stream_state["ranks"][0]["micro_batches"]) == (150 // 7, 150)
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["data/skipped"] == 0


@pytest.mark.slow
def test_sigkill_resume_is_exact_when_checkpoints_fall_on_shard_boundaries(tmp_path, monkeypatch):
    """No shuffle buffer, a checkpoint every 2 shards: the shard-boundary resume replays exactly."""
    if _in_own_process("test_sigkill_resume_is_exact_when_checkpoints_fall_on_shard_boundaries"):
        return
    write_shards(tmp_path / "shards")  # 6 shards x 4 samples, batch 2
    monkeypatch.setenv("CAPTION_SHARDS_DIR", str(tmp_path / "shards"))
    monkeypatch.setenv("CAPTION_DELAY", "0.04")
    # (the reference run reads with no loader worker, and a stream's batch order depends on the number
    # of workers, so only the worker-free run can be compared with it bit for bit)
    check_sigkill_resume(tmp_path, f"{SETUP}:exact_setup", kill_at=((0, 8, 0.0),))


@pytest.mark.slow
def test_sigkill_resume_continues_with_the_right_shards(tmp_path, monkeypatch):
    """A shuffle buffer of 6: after the kill, the run goes on with the shards not opened at the
    checkpoint; the samples the opened shards still held are skipped, none is trained on twice."""
    if _in_own_process("test_sigkill_resume_continues_with_the_right_shards"):
        return
    write_shards(tmp_path / "shards", num_shards=10)  # 40 samples: the 10 steps of batch 2 stay in epoch 0
    monkeypatch.setenv("CAPTION_SHARDS_DIR", str(tmp_path / "shards"))
    monkeypatch.setenv("CAPTION_DELAY", "0.05")
    out = tmp_path / "run"
    proc = start_run(out, f"{SETUP}:buffered_setup")
    kill_after(proc, out / checkpoint_name(4))
    output = finish_run(start_run(out, f"{SETUP}:buffered_setup", "--resume"))
    assert "resuming at step 4" in output and "shard boundary" in output
    at_kill = load_file(out / checkpoint_name(4) / "model.safetensors")["shard_hits"]
    final = load_file(out / "checkpoint-last" / "model.safetensors")["shard_hits"]
    state = json.loads((out / checkpoint_name(4) / "trainer_state.json").read_text())["data_stream"]["ranks"][0]
    opened = state["opened"]
    assert int(at_kill.sum()) == 8 and int(final.sum()) == 20
    assert (final <= PER_SHARD).all()  # no shard read twice in the epoch
    assert all(final[s] == at_kill[s] for s in opened)  # the opened shards are done
    plan = shard_plan(10, seed=caption_recipe().seed, epoch=0)
    left = [s for s in plan if s not in opened]
    touched = [s for s in left if final[s] > 0]
    assert touched == left[: len(touched)]  # the next shards in the plan, none skipped
    assert sum(PER_SHARD - int(final[s]) for s in touched) <= 6  # the rest still sat in the shuffle buffer


@pytest.mark.slow
def test_two_ranks_stream_uneven_shards_and_resume_on_one(tmp_path, monkeypatch):
    """5 shards over 2 gloo processes (3 and 2 a rank): both ranks train to the end (each rank's stream
    is endless, so no rank waits for data), the checkpoint holds both positions, and the run resumes
    as one process on the shards neither rank had opened."""
    write_shards(tmp_path / "shards", num_shards=5)
    monkeypatch.setenv("CAPTION_SHARDS_DIR", str(tmp_path / "shards"))
    monkeypatch.setenv("CAPTION_ITERS", "7")
    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, free_port(), str(out), f"{SETUP}:buffered_setup", 2), nprocs=2, join=True)
    state = json.loads((out / "checkpoint-last" / "trainer_state.json").read_text())["data_stream"]
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    for rank, r in enumerate(state["ranks"]):
        assert r["micro_batches"] == 7
        assert set(r["opened"]) <= set(shard_plan(5, seed=3, epoch=r["epoch"], rank=rank, world_size=2))
    monkeypatch.setenv("CAPTION_ITERS", "9")
    recipe, model, ds = buffered_setup()
    with pytest.warns(UserWarning, match="written with 2 ×"):
        result = train(recipe, model, ds, out, resume=True, progress=False)
    assert result.step == 9


@pytest.mark.parametrize("recipe_name", ["vilseg_clip_vitb_coco_captions", "vilseg_clip_vitb_cc3m"])
def test_build_training_feeds_caption_data_to_the_vilseg_model(recipe_name, tiny_clip_dir, tmp_path):
    """The registered ViL-Seg recipes on their TRAIN_DATA entries: nothing needs class names, and the
    batches are what ViL-Seg's training_step takes (tiny random CLIP, 2 steps)."""
    torch.set_num_threads(1)
    root = tmp_path / "data"
    if "coco" in recipe_name:  # COCO Captions: annotations/captions_train2017.json + train2017/
        (root / "annotations").mkdir(parents=True)
        (root / "train2017").mkdir()
        images = [{"id": k, "file_name": f"{k:012d}.jpg"} for k in range(4)]
        anns = [{"id": k, "image_id": k, "caption": f"shard {k} sample 0"} for k in range(4)]
        (root / "annotations" / "captions_train2017.json").write_text(
            json.dumps({"images": images, "annotations": anns})
        )
        for k in range(4):
            (root / "train2017" / f"{k:012d}.jpg").write_bytes(jpeg(colour(k)))
    else:
        write_shards(root)
    head = '{"clusters": 5, "head_dim": 32, "head_hidden": 32, "head_bottleneck": 8, "trainable_blocks": 1}'
    recipe = get_recipe(recipe_name).with_overrides(
        [
            f'model.clip_model="local-dir:{tiny_clip_dir}"',
            "model.pretrained=null",
            f"model.options={head}",
            "data.crop=32",
            "data.options.local_size=16",
            "data.options.local_crops=2",
            "data.num_workers=0",
            "batch_size=2",
            "max_iters=2",
            'amp="none"',
        ]
    )
    setup = build_training(recipe, root)
    assert setup.validate is None and not hasattr(setup.dataset, "vocabulary")
    result = train(recipe, setup.model, setup.dataset, tmp_path / "run", progress=False)
    assert result.step == 2 and {"vision", "cross", "cluster"} <= set(result.metrics)
