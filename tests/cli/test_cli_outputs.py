"""What ``vocabseg segment`` writes, value for value, and the registered defaults it runs with."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from vocabseg import Segmenter
from vocabseg.cli.main import main
from vocabseg.methods import get_method_spec

SETTINGS = {"short_side": 64, "crop": 32, "stride": 16}
CLASSES = "sky, tree; bush, road"


def test_naclip_registers_pamr_with_dilations_8_and_16():
    defaults = get_method_spec("naclip").defaults
    assert defaults.pamr_steps > 0  # PAMR is on by default in NACLIP's evaluation
    assert defaults.pamr_dilations == (8, 16)


def test_mask_png_holds_the_labels_of_the_python_api(tmp_path, small_clip_dir, rgb_image):
    """NACLIP runs PAMR by default, so the command's defaults, its settings flags and its mask writer
    must all agree with the Python API's for the pixels to match."""
    path = tmp_path / "scene.png"
    Image.fromarray(rgb_image).save(path)
    model = f"local-dir:{small_clip_dir}"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    args = ["segment", str(path), "-c", CLASSES, "--background", "wall", "-o", str(tmp_path / "out")]
    assert main([*args, "--method", "naclip", "--model", model, *flags]) == 0

    seg = Segmenter(method="naclip", model=model, text_cache_dir=None, **SETTINGS)
    expected = seg.segment(rgb_image, CLASSES, background="wall")
    assert len(np.unique(expected.labels)) >= 3  # a mask of one class would prove little

    mask = Image.open(tmp_path / "out" / "scene" / "mask.png")
    assert mask.mode == "P"
    np.testing.assert_array_equal(np.asarray(mask), expected.labels)
    palette = np.asarray(mask.getpalette()[: 3 * len(expected.classes)]).reshape(-1, 3)
    np.testing.assert_array_equal(palette, expected.colors)
    data = json.loads((tmp_path / "out" / "scene" / "result.json").read_text())
    assert data["settings"] == expected.info["settings"]
    assert data["settings"]["pamr_dilations"] == [8, 16]
    assert [c["name"] for c in data["classes"]] == expected.classes == ["sky", "tree", "road", "background"]
