"""Degenerate image shapes (10000x3, 3x10000, 20000x1, a short side of 8) through every kind of method,
and a batch in which one image fails without costing the others."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_vfm

from vocabseg import Segmenter
from vocabseg.errors import ImageLoadError, SegmentationFailedError
from vocabseg.inference.sliding import rescaled_size, sliding_window_logits
from vocabseg.segmenter import MIN_WINDOW_PATCHES

THIN_SHAPES = [(10000, 3), (3, 10000), (20000, 1)]
CLASSES = "cat, dog; puppy, sofa"


def thin_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


# -- the window arithmetic -----------------------------------------------------------------------------------------
def test_rescaled_size_never_rounds_a_side_to_zero():
    assert rescaled_size(20000, 1, 336, 2048) == (2048, 1)  # 1 * 0.1024 would round to 0
    assert rescaled_size(3, 10000, 336, 2048) == (1, 2048)  # 3 * 0.2048 = 0.61 -> 1 already
    assert rescaled_size(60, 80, 8, 2048) == (8, 11)


def test_small_windows_are_padded_bottom_right_and_cropped_back():
    image = torch.randn(3, 5, 40)
    seen = []

    def window_logits(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.clone())
        # depends on every pixel of the window, padding included, so a wrong crop would show
        return batch[:, :2] + batch.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)

    (out,) = sliding_window_logits([image], window_logits, crop=0, stride=1, batch_size=4, min_size=(16, 12))
    (batch,) = seen
    assert batch.shape == (1, 3, 16, 40)  # only the short side is padded
    torch.testing.assert_close(batch[0, :, :5], image)
    assert torch.count_nonzero(batch[0, :, 5:]) == 0
    torch.testing.assert_close(out, window_logits(batch)[0, :, :5, :40])


def test_windows_at_least_min_size_are_not_padded():
    image = torch.randn(3, 48, 64)
    shapes = []

    def window_logits(batch: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(batch.shape[-2:]))
        return batch[:, :2]

    (out,) = sliding_window_logits([image], window_logits, crop=32, stride=16, batch_size=8, min_size=(32, 32))
    assert set(shapes) == {(32, 32)}
    torch.testing.assert_close(out, image[:2])


# -- through the Segmenter, every kind of method ------------------------------------------------------------------
@pytest.fixture(scope="module")
def segmenters(tiny_clip, tiny_clip_dir):
    """Small settings, with a long-side cap that rounds the short side of every thin shape to 0."""
    small = dict(short_side=64, max_long_side=256, text_cache_dir=None, templates="name")
    with pytest.warns(UserWarning, match="RANDOM"):
        beyond = Segmenter(
            method="beyond_labels",
            model=f"local-dir:{tiny_clip_dir}",
            weights=None,
            method_kwargs=dict(width=32, depth=1, heads=2, decoder_stages=2, fourier_frequencies=8),
            crop=32,
            stride=16,
            **small,
        )
    return {
        "sclip": Segmenter(method="sclip", model=tiny_clip, crop=32, stride=16, **small),
        "maskclip": Segmenter(method="maskclip", model=tiny_clip, crop=0, **small),  # whole image, one window
        "proxyclip": Segmenter(method="proxyclip", model=tiny_clip, vfm=make_tiny_vfm(), crop=48, stride=24, **small),
        "naclip": Segmenter(method="naclip", model=tiny_clip, crop=32, stride=16, pamr_steps=2, **small),
        "beyond_labels": beyond,
    }


def assert_valid(result, shape: tuple[int, int]) -> None:
    assert result.labels.shape == shape and result.probs.shape == (3, *shape)
    assert np.isfinite(result.probs).all()
    assert set(np.unique(result.labels)) <= {0, 1, 2}


@pytest.mark.parametrize("method", ["sclip", "maskclip", "proxyclip", "naclip", "beyond_labels"])
def test_thin_images_are_segmented_by_every_kind_of_method(segmenters, method):
    seg = segmenters[method]
    images = [thin_image(*shape, seed=i) for i, shape in enumerate(THIN_SHAPES)]
    results = seg.segment(images, CLASSES)
    for result, shape in zip(results, THIN_SHAPES):
        assert_valid(result, shape)


@pytest.mark.parametrize("method", ["sclip", "maskclip", "proxyclip", "beyond_labels"])
def test_short_side_smaller_than_a_patch(segmenters, rgb_image, method):
    """short_side=8 makes a 50x70 image 8x11, below one 16-pixel patch of the tiny CLIP."""
    result = segmenters[method].segment(rgb_image, CLASSES, short_side=8)
    assert_valid(result, (50, 70))


def test_crop_smaller_than_a_patch(segmenters, rgb_image):
    result = segmenters["sclip"].segment(rgb_image, CLASSES, crop=8, stride=8)
    assert_valid(result, (50, 70))


def test_min_window_is_two_patches_of_the_clip_model(segmenters, tiny_clip):
    assert tiny_clip.visual.patch_size == (16, 16)
    shapes = []
    seg = segmenters["sclip"]
    original = seg.method.logits

    def spy(windows, text, **kwargs):
        shapes.append(tuple(windows.shape[-2:]))
        return original(windows, text, **kwargs)

    seg.method.logits = spy
    try:
        seg.segment(thin_image(3, 10000), CLASSES)
    finally:
        del seg.method.logits
    assert shapes and all(s == (MIN_WINDOW_PATCHES * 16, 32) for s in shapes)


# -- one image failing in a batch ----------------------------------------------------------------------------------
@pytest.fixture()
def failing_on_uniform(tiny_clip, monkeypatch):
    """An sclip Segmenter whose pipeline raises on an image of one colour (a stand-in for a bug)."""
    seg = Segmenter(method="sclip", model=tiny_clip, text_cache_dir=None, short_side=64, crop=32, stride=16)
    original = seg._normalize

    def normalize(array: np.ndarray) -> torch.Tensor:
        if array.min() == array.max():
            raise RuntimeError("boom: uniform image")
        return original(array)

    monkeypatch.setattr(seg, "_normalize", normalize)
    return seg


def test_an_unexpected_error_costs_only_its_own_image(failing_on_uniform, rgb_image):
    seg = failing_on_uniform
    other = np.ascontiguousarray(rgb_image[::-1])
    uniform = np.full((40, 40, 3), 77, dtype=np.uint8)
    sources = [rgb_image, uniform, b"not an image", other]
    outcomes = list(seg.segment_many(sources, CLASSES, on_error="skip", images_per_batch=4))
    assert [o.index for o in outcomes] == [0, 1, 2, 3]
    assert [o.ok for o in outcomes] == [True, False, False, True]
    failed = outcomes[1].error
    assert isinstance(failed, SegmentationFailedError)
    assert str(failed) == "<array>: segmentation failed (RuntimeError: boom: uniform image)"
    assert isinstance(failed.__cause__, RuntimeError)
    assert isinstance(outcomes[2].error, ImageLoadError)
    # the images batched with the failing one get the results they would get alone
    for outcome, image in ((outcomes[0], rgb_image), (outcomes[3], other)):
        alone = seg.segment(image, CLASSES)
        np.testing.assert_allclose(outcome.result.probs, alone.probs, atol=1e-5)


def test_on_error_raise_raises_the_original_exception(failing_on_uniform, rgb_image):
    uniform = np.full((40, 40, 3), 77, dtype=np.uint8)
    with pytest.raises(RuntimeError, match="boom: uniform image"):
        list(failing_on_uniform.segment_many([rgb_image, uniform], CLASSES))
    with pytest.raises(RuntimeError, match="boom: uniform image"):
        failing_on_uniform.segment(uniform, CLASSES)
