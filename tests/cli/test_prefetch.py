"""Decoding ahead and writing behind: the same outcomes, in the same order, and no thread left running."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

import vocabseg.segmenter
from vocabseg import Segmenter
from vocabseg.cli.main import main
from vocabseg.errors import ImageLoadError, SettingsError
from vocabseg.result import SegmentationResult
from vocabseg.segmenter import map_ahead

SMALL = dict(short_side=64, crop=32, stride=16)


def ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vocabseg-ahead")]


# -- map_ahead ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_order_and_errors_are_kept_with_uneven_delays(depth):
    delays = np.random.default_rng(depth).uniform(0, 0.01, size=12)

    def slow(i: int) -> int:
        time.sleep(delays[i])
        if i % 4 == 1:
            raise ValueError(f"bad {i}")
        return i * i

    out = list(map_ahead(slow, range(12), depth))
    assert [item for item, _ in out] == list(range(12))
    for i, value in out:
        if i % 4 == 1:
            assert isinstance(value, ValueError) and str(value) == f"bad {i}"
        else:
            assert value == i * i
    assert ahead_threads() == []


def test_work_runs_ahead_on_another_thread():
    """While the caller holds item 0, the next ``depth`` items are already being worked on."""
    started = {i: threading.Event() for i in range(4)}
    threads = set()

    def work(i: int) -> int:
        threads.add(threading.get_ident())
        started[i].set()
        return i

    results = map_ahead(work, range(4), depth=2)
    assert next(results) == (0, 0)
    assert started[1].wait(5) and started[2].wait(5)
    assert list(results) == [(1, 1), (2, 2), (3, 3)]
    assert threads and threading.get_ident() not in threads


def test_an_error_while_iterating_the_items_reaches_the_caller():
    def items():
        yield 1
        raise OSError("folder vanished")

    with pytest.raises(OSError, match="folder vanished"):
        list(map_ahead(lambda i: i, items(), 2))
    assert ahead_threads() == []


def test_closing_early_finishes_the_item_at_hand_and_cancels_the_rest():
    done = []
    running, release = threading.Event(), threading.Event()

    def work(i: int) -> int:
        if i == 1:
            running.set()
            release.wait(5)
        done.append(i)
        return i

    results = map_ahead(work, range(10), depth=3)
    with contextlib.closing(results):
        assert next(results) == (0, 0)
        assert running.wait(5)  # item 1 is running, 2 and 3 wait their turn
        threading.Timer(0.1, release.set).start()
    assert done == [0, 1]  # closing waited for item 1; 2 and 3 were cancelled, 4 to 9 never submitted
    assert ahead_threads() == []


def test_keyboard_interrupt_in_the_caller_stops_the_thread():
    results = map_ahead(lambda i: time.sleep(0.01) or i, range(100), 4)
    with pytest.raises(KeyboardInterrupt), contextlib.closing(results):
        for i, _ in results:
            if i == 2:
                raise KeyboardInterrupt
    assert ahead_threads() == []


# -- Segmenter.segment_many ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg(tiny_clip):
    return Segmenter(method="sclip", model=tiny_clip, text_cache_dir=None, templates=["{}"], **SMALL)


@pytest.fixture()
def slow_loader(monkeypatch):
    """``load_image`` with uneven delays (later images often faster) that refuses sources named "bad..."."""
    real = vocabseg.segmenter.load_image
    decoded_on = set()

    def load(source, max_pixels=None):
        decoded_on.add(threading.get_ident())
        time.sleep(0.02 if isinstance(source, np.ndarray) and source.shape[0] % 2 else 0.001)
        if isinstance(source, str):
            raise ImageLoadError(f"{source}: not an image")
        return real(source, max_pixels)

    monkeypatch.setattr(vocabseg.segmenter, "load_image", load)
    return decoded_on


def make_sources() -> list:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(30 + i, 40 + 2 * i, 3), dtype=np.uint8) for i in range(7)]
    return [images[0], "bad-1.jpg", *images[1:4], "bad-2.jpg", "bad-3.jpg", *images[4:]]


@pytest.mark.parametrize("images_per_batch", [1, 3])
def test_prefetched_outcomes_equal_the_sequential_ones(seg, slow_loader, images_per_batch):
    sources = make_sources()

    def run(prefetch):
        return list(
            seg.segment_many(
                sources, "cat, dog, sofa", on_error="skip", images_per_batch=images_per_batch, prefetch=prefetch
            )
        )

    sequential, prefetched = run(0), run(4)
    assert threading.get_ident() in slow_loader and len(slow_loader) == 2  # decoded here, then on the thread
    assert [o.index for o in prefetched] == list(range(10))
    assert [str(o.error) if o.error else None for o in prefetched] == [
        None, "bad-1.jpg: not an image", None, None, None, "bad-2.jpg: not an image", "bad-3.jpg: not an image",
        None, None, None,
    ]  # fmt: skip
    for a, b in zip(sequential, prefetched):
        assert (a.index, a.ok, str(a.error)) == (b.index, b.ok, str(b.error))
        assert a.source is b.source is sources[a.index]
        if a.ok:
            np.testing.assert_array_equal(a.result.labels, b.result.labels)
            np.testing.assert_array_equal(a.result.probs, b.result.probs)
    assert ahead_threads() == []


def test_a_decoding_error_is_raised_in_order_with_on_error_raise(seg, slow_loader):
    seen = []
    with pytest.raises(ImageLoadError, match="bad-1.jpg"):
        for outcome in seg.segment_many(make_sources(), "cat, dog", on_error="raise", images_per_batch=1, prefetch=3):
            seen.append(outcome.index)
    assert seen == [0]
    assert ahead_threads() == []


def test_prefetch_must_be_a_count(seg):
    with pytest.raises(SettingsError, match="prefetch"):
        seg.segment_many([], "cat", prefetch=-1)


# -- vocabseg segment -------------------------------------------------------------------------------------------
@pytest.fixture()
def folder(tmp_path, tiny_clip_dir):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(6):
        path = tmp_path / "in" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(30 + 5 * i, 50, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    paths.insert(2, tmp_path / "in" / "broken.png")
    model = ["--model", f"local-dir:{tiny_clip_dir}", "--method", "sclip", "--templates", "name"]
    model += [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    return paths, model


def test_command_writes_what_the_library_computes(tmp_path, folder, capsys):
    paths, model = folder
    out = tmp_path / "out"
    code = main(
        ["segment", *map(str, paths), "-c", "cat, dog, sofa", "-o", str(out), "--images-per-batch", "2", *model]
    )
    assert code == 1 and "6 of 7 image(s) segmented" in capsys.readouterr().err
    seg = Segmenter(method="sclip", model=model[1], text_cache_dir=None, templates="name", **SMALL)
    for path in paths:
        if path.name == "broken.png":
            assert not (out / "broken").exists()
            continue
        want = seg.segment(str(path), "cat, dog, sofa")
        np.testing.assert_array_equal(np.asarray(Image.open(out / path.stem / "mask.png")), want.labels)
        data = json.loads((out / path.stem / "result.json").read_text())
        assert [c["pixels"] for c in data["classes"]] == [c["pixels"] for c in want.class_stats()]
        assert data["image"] == str(path)
    assert sorted(p.name for p in out.rglob("*")) == sorted(
        [p.stem for p in paths if p.name != "broken.png"] + ["mask.png", "overlay.png", "result.json"] * 6
    )  # nothing half-written (no temporary files)
    assert ahead_threads() == []


def test_interrupted_command_stops_its_threads_and_leaves_whole_files(tmp_path, folder, capsys, monkeypatch):
    paths, model = folder
    real, calls = Segmenter.predict_arrays, []

    def interrupted(self, arrays, *args, **kwargs):
        calls.append(len(arrays))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, arrays, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "predict_arrays", interrupted)
    out = tmp_path / "out"
    assert (
        main(["segment", *map(str, paths), "-c", "cat, dog", "-o", str(out), "--images-per-batch", "1", *model]) == 130
    )
    assert "vocabseg: interrupted" in capsys.readouterr().err
    assert ahead_threads() == []
    written = sorted(p.parent.name for p in out.rglob("result.json"))
    assert written == ["img0", "img1"]  # the two images segmented before the interruption, written whole
    for name in written:
        assert {p.name for p in (out / name).iterdir()} == {"mask.png", "overlay.png", "result.json"}
        json.loads((out / name / "result.json").read_text())


def test_a_failed_write_stops_the_command(tmp_path, folder, monkeypatch):
    paths, model = folder
    real = SegmentationResult.save

    def save(self, out_dir):
        if out_dir.name == "img1":
            raise OSError(28, "No space left on device")
        return real(self, out_dir)

    monkeypatch.setattr(SegmentationResult, "save", save)
    with pytest.raises(OSError, match="No space left"):
        main(["segment", *map(str, paths), "-c", "cat, dog", "-o", str(tmp_path / "out"), *model])
    assert ahead_threads() == []
