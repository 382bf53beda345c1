"""What the Python API accepts as an image and what it says about the rest; strictly valid result.json."""

from __future__ import annotations

import gc
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from vocabseg import Segmenter
from vocabseg.errors import ImageLoadError
from vocabseg.io.images import load_image
from vocabseg.result import SegmentationResult


# -- float arrays ----------------------------------------------------------------------------------------------------
def test_float_array_in_0_1_is_scaled():
    arr = np.zeros((2, 3, 3), dtype=np.float32)
    arr[0, 0] = 1.0
    arr[1, 2] = (0.5, 0.25, 0.0)
    out = load_image(arr)
    assert out.dtype == np.uint8
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 0, 0]
    assert out[1, 2].tolist() == [128, 64, 0]


def test_float_array_in_0_255_is_refused_with_the_fix():
    arr = np.full((4, 4, 3), 200.0)
    arr[0, 0] = 0.0
    with pytest.raises(ImageLoadError) as info:
        load_image(arr)
    assert str(info.value) == (
        "A float image array must have values in [0, 1], got values from 0 to 200. For an image in 0-255, "
        "convert it with .astype(np.uint8) or divide it by 255."
    )


def test_negative_and_infinite_floats_are_refused():
    with pytest.raises(ImageLoadError, match=r"values in \[0, 1\], got values from -0.5 to 0.5"):
        load_image(np.array([[-0.5, 0.5]], dtype=np.float64))
    with pytest.raises(ImageLoadError, match=r"got values from 0 to inf"):
        load_image(np.array([[0.0, np.inf]], dtype=np.float32))


def test_nan_floats_are_refused():
    arr = np.full((3, 3, 3), 0.5, dtype=np.float32)
    arr[1, 1, 1] = np.nan
    with pytest.raises(ImageLoadError, match="contains NaN values"):
        load_image(arr)


# -- wrong kinds of source -------------------------------------------------------------------------------------------
def test_none_and_other_types_name_what_is_accepted():
    with pytest.raises(ImageLoadError) as info:
        load_image(None)
    assert str(info.value) == (
        "Expected an image as a file path, encoded bytes, a PIL image or a numpy array; got None."
    )
    with pytest.raises(ImageLoadError, match="numpy array; got int"):
        load_image(5)


def test_segment_none_says_none_was_given(tiny_clip):
    seg = Segmenter(method="sclip", model=tiny_clip, text_cache_dir=None, short_side=64, crop=32, stride=16)
    with pytest.raises(ImageLoadError, match="; got None"):
        seg.segment(None, "cat, dog")


def test_a_directory_is_reported_as_a_directory(tmp_path):
    folder = tmp_path / "photos.png"
    folder.mkdir()
    with pytest.raises(ImageLoadError) as info:
        load_image(folder)
    assert str(info.value) == f"{folder}: is a directory, not an image file"
    with pytest.raises(ImageLoadError, match="missing.png: no such file"):
        load_image(tmp_path / "missing.png")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_pipe_is_refused_without_blocking(tmp_path):
    pipe = tmp_path / "stream.png"
    os.mkfifo(pipe)
    with pytest.raises(ImageLoadError, match="stream.png: not a regular file"):
        load_image(pipe)


def test_bytearray_is_read_like_bytes(tmp_path, rgb_image):
    path = tmp_path / "x.png"
    Image.fromarray(rgb_image).save(path)
    np.testing.assert_array_equal(load_image(bytearray(path.read_bytes())), rgb_image)


# -- files are closed ------------------------------------------------------------------------------------------------
def test_no_file_is_left_open(tmp_path, rgb_image):
    good = tmp_path / "x.png"
    Image.fromarray(rgb_image).save(good)
    jpeg = tmp_path / "y.jpg"
    Image.fromarray(rgb_image).save(jpeg, quality=90)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:200])
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for path in (good, jpeg, str(good)):
            assert load_image(path).shape == (50, 70, 3)
        for path in (cut, text):
            with pytest.raises(ImageLoadError):
                load_image(path)
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


# -- result.json -----------------------------------------------------------------------------------------------------
def refuse_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def test_result_json_has_no_nan_or_infinity(tmp_path):
    labels = np.array([[0, 1], [1, 1]], dtype=np.int32)
    probs = np.full((2, 2, 2), 0.5, dtype=np.float32)
    probs[0, 0, 0] = np.nan  # a diverged score
    result = SegmentationResult(
        labels=labels,
        classes=["cat", "dog"],
        probs=probs,
        image=np.zeros((2, 2, 3), dtype=np.uint8),
        synonyms=[["cat"], ["dog"]],
        info={"settings": {"logit_scale": float("inf"), "pamr_dilations": [8, 16]}, "score": np.float32(0.25)},
    )
    paths = result.save(tmp_path / "out")
    data = json.loads(paths["json"].read_text(), parse_constant=refuse_constant)
    assert [c["mean_score"] for c in data["classes"]] == [None, 0.5]
    assert data["settings"] == {"logit_scale": None, "pamr_dilations": [8, 16]}
    assert data["score"] == 0.25
    assert json.dumps(result.to_json(), allow_nan=False)  # what a web server's JSON response does
