"""Fixtures for the server tests: tiny random-weight segmenters."""

from __future__ import annotations

import pytest

from vocabseg import Segmenter, WeightsUnavailableError

from .helpers import SETTINGS


@pytest.fixture(scope="session")
def make_segmenter(tiny_clip):
    """method -> Segmenter on the tiny CLIP; proxyclip fails as it does offline without VFM weights."""

    def create(method: str) -> Segmenter:
        if method == "proxyclip":
            raise WeightsUnavailableError("Could not load pretrained weights for VFM 'dino_vitb8' (test: offline)")
        return Segmenter(method=method, model=tiny_clip, text_cache_dir=None, **SETTINGS)

    return create


@pytest.fixture(scope="session")
def reference(make_segmenter):
    """A separate segmenter for the expected results (same weights as the servers')."""
    return make_segmenter("sclip")
