"""Resuming a weighted benchmark (PASCAL-5i, HSNet's 1000 episodes) gives the uninterrupted result:
resumed records count with their episode weight, exactly like computed ones."""

from __future__ import annotations

import json

import pytest
import torch

from vocabseg import Segmenter
from vocabseg.data import build_dataset
from vocabseg.data.synthetic import write_synthetic_pascal5i
from vocabseg.eval import evaluate

SMALL = {"short_side": 64, "crop": 32, "stride": 16}


@pytest.fixture(scope="module")
def segmenter(tiny_clip):
    return Segmenter(method="sclip", model=tiny_clip, text_cache_dir=None, templates=["a photo of a {}."], **SMALL)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = write_synthetic_pascal5i(tmp_path_factory.mktemp("voc"), num_images=4, hsnet_lists=True, seed=1)
    ds = build_dataset("pascal5i-0", root, episodes="hsnet1000")
    # 11 pairs: 1000 = 90 * 11 + 10, so the first 10 pairs count 91 times and the last one 90 times
    assert len(ds.samples) == 11 and sum(s.weight for s in ds.samples) == 1000
    assert {s.weight for s in ds.samples} == {90, 91} and {s.group for s in ds.samples} == set(range(5))
    return ds


def _evaluate(segmenter, dataset, out_dir, **kwargs):
    return evaluate(segmenter, dataset, protocol="unified", overrides=SMALL, out_dir=out_dir, progress=False, **kwargs)


def _assert_same(result, full) -> None:
    assert torch.equal(result.accumulator, full.accumulator)
    assert json.dumps(result.all_metrics) == json.dumps(full.all_metrics)  # exactly, NaN included
    written, expected = (json.loads((r.run_dir / "result.json").read_text()) for r in (result, full))
    assert written["all_metrics"] == expected["all_metrics"]


def test_killed_midway_then_resumed_equals_the_uninterrupted_run(tmp_path, segmenter, dataset, monkeypatch):
    full = _evaluate(segmenter, dataset, tmp_path / "full")
    assert full.info["computed"] == 11

    real, calls = segmenter.predict_arrays, []

    def killed_after_four(arrays, *args, **kwargs):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(len(arrays))
        return real(arrays, *args, **kwargs)

    monkeypatch.setattr(segmenter, "predict_arrays", killed_after_four)
    with pytest.raises(KeyboardInterrupt):
        _evaluate(segmenter, dataset, tmp_path / "b", images_per_batch=1)
    monkeypatch.undo()
    run_dir = tmp_path / "b" / "pascal5i-0" / full.run_dir.name
    assert len(list((run_dir / "records").glob("*.json"))) == 4 and not (run_dir / "result.json").exists()

    resumed = _evaluate(segmenter, dataset, tmp_path / "b")
    assert (resumed.info["computed"], resumed.info["resumed"]) == (7, 4)
    _assert_same(resumed, full)

    again = _evaluate(segmenter, dataset, tmp_path / "b")  # everything resumed, every weight applied
    assert (again.info["computed"], again.info["resumed"]) == (0, 11)
    _assert_same(again, full)


def test_deleted_records_are_recomputed_and_the_rest_resumed_with_their_weights(tmp_path, segmenter, dataset):
    full = _evaluate(segmenter, dataset, tmp_path / "out")
    heavy = [s for s in dataset.samples if s.weight == 91]
    deleted = [heavy[0], heavy[3], next(s for s in dataset.samples if s.weight == 90)]
    for s in deleted:
        (full.run_dir / "records" / f"{s.id}.json").unlink()
    resumed = _evaluate(segmenter, dataset, tmp_path / "out")
    assert (resumed.info["computed"], resumed.info["resumed"]) == (3, 8)
    _assert_same(resumed, full)
