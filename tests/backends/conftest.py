"""Fixtures for the backend tests: every method the backends can export, on the tiny CLIP (and the tiny
VFM for ProxyCLIP), and one export cache shared by the whole session, so each export is made once."""

from __future__ import annotations

import pytest
import torch

from vocabseg.backends import exportable_methods
from vocabseg.methods import create_method, get_method_spec


@pytest.fixture(scope="session")
def dense_methods(tiny_clip, tiny_vfm) -> dict[str, torch.nn.Module]:
    """name -> a method; built for every registered one an export can hold, so new methods are tested too."""
    methods = {}
    for name in exportable_methods():
        options = {"vfm": tiny_vfm} if get_method_spec(name).uses_vfm else {}
        methods[name] = create_method(name, tiny_clip, **options).eval()
    return methods


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    """The vocabseg cache folder of the session's exports (they go to its onnx/ subfolder)."""
    return tmp_path_factory.mktemp("vocabseg-cache")
