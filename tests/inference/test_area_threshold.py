"""``area_threshold`` through the Segmenter: a class covering too little of the image leaves the labels.

The method is a stub whose logits are fixed, so which class covers how many pixels is known exactly:
"wall" everywhere at 0.5, a 6 x 6 "dot" at 1 (36 of 2400 pixels: 1.5 %), a 40 x 20 "door" at 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vocabseg import Segmenter
from vocabseg.methods.base import SegmentationMethod

HEIGHT, WIDTH = 40, 60
CLASSES = "wall, dot, door"


class FixedLogits(SegmentationMethod):
    """A training-free method (SCLIP's settings) whose logits ignore the image and the text."""

    method_name = "sclip"

    def __init__(self):
        super().__init__()
        logits = torch.zeros(3, HEIGHT, WIDTH)
        logits[0] = 0.5
        logits[1, 10:16, 10:16] = 1.0
        logits[2, :, 40:] = 1.0
        self.register_buffer("fixed", logits)

    def logits(self, windows, text, *, pad_multiple=0, surgery=False):
        assert tuple(windows.shape[-2:]) == (HEIGHT, WIDTH) and text.shape[0] == 3
        return self.fixed.expand(windows.shape[0], -1, -1, -1)


@pytest.fixture(scope="module")
def labels_without_threshold() -> np.ndarray:
    labels = np.zeros((HEIGHT, WIDTH), np.int32)
    labels[10:16, 10:16] = 1
    labels[:, 40:] = 2
    return labels


def make_segmenter(tiny_clip, **settings) -> Segmenter:
    return Segmenter(
        method=FixedLogits(),
        model=tiny_clip,
        text_cache_dir=None,
        templates=["{}"],
        short_side=0,
        crop=0,
        **settings,
    )


def image() -> np.ndarray:
    return np.full((HEIGHT, WIDTH, 3), 128, np.uint8)


def test_a_class_below_the_area_threshold_is_dropped(tiny_clip, labels_without_threshold):
    seg = make_segmenter(tiny_clip)
    np.testing.assert_array_equal(seg.segment(image(), CLASSES).labels, labels_without_threshold)
    # 1.5 % of the image: kept at 1 %, dropped at 2 % (its pixels go to the next best class, wall)
    kept = seg.segment(image(), CLASSES, area_threshold=0.01)
    np.testing.assert_array_equal(kept.labels, labels_without_threshold)
    dropped = seg.segment(image(), CLASSES, area_threshold=0.02)
    want = np.where(labels_without_threshold == 1, 0, labels_without_threshold)
    np.testing.assert_array_equal(dropped.labels, want)
    assert dropped.info["settings"]["area_threshold"] == 0.02


def test_the_area_threshold_given_to_the_segmenter_is_its_default(tiny_clip, labels_without_threshold):
    seg = make_segmenter(tiny_clip, area_threshold=0.02)
    assert not (seg.segment(image(), CLASSES).labels == 1).any()
    overridden = seg.segment(image(), CLASSES, area_threshold=0.0)  # a per-call value wins
    np.testing.assert_array_equal(overridden.labels, labels_without_threshold)


def test_the_area_is_a_fraction_of_the_foreground(tiny_clip):
    # with "door" as the background, the foreground is 1600 pixels and the dot 2.25 % of it
    seg = make_segmenter(tiny_clip)
    res = seg.segment(image(), "wall, dot", background="door", area_threshold=0.02)
    assert res.background_index == 2
    assert (res.labels == 1).sum() == 36
    res = seg.segment(image(), "wall, dot", background="door", area_threshold=0.03)
    assert (res.labels == 1).sum() == 0
