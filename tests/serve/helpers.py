"""Helpers shared by the server tests (images, a blocking segmenter)."""

from __future__ import annotations

import io
import threading

import numpy as np
from PIL import Image

from vocabseg import Segmenter

SETTINGS = {"short_side": 64, "crop": 32, "stride": 16}


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_image(seed: int, height: int = 50, width: int = 70) -> np.ndarray:
    """An image with two halves of different colour plus noise (so the labels are not all one class)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    img[:, : width // 2, seed % 3] += 180
    img[:, width // 2 :, (seed + 1) % 3] += 180
    return img


class Gate:
    """A segmenter that blocks inside ``segment_many`` (what the server calls) until released, to fill
    the queue deterministically; ``calls`` counts the segmentations that ran."""

    def __init__(self, segmenter: Segmenter):
        self._segmenter = segmenter
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self._segmenter, name)

    def segment_many(self, *args, **kwargs):
        self.calls += 1
        self.entered.set()
        assert self.release.wait(60), "test gate never released"
        return self._segmenter.segment_many(*args, **kwargs)
