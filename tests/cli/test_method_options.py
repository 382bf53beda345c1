"""`-O KEY=VALUE` and `--mask-model` reach the method's options; mistakes are one line, exit 2, before loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vocabseg.cli.main import main


@pytest.fixture
def image_path(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    return tmp_path / "x.png"


def run(image_path, out, model_dir, *extra):
    return main(["segment", str(image_path), "-c", "cat, dog, sky", "-o", str(out), "--model", f"local-dir:{model_dir}",
                 "--templates", "name", "--short-side", "0", *extra])  # fmt: skip


def test_method_options_reach_the_method(image_path, tmp_path, tiny_clip_dir):
    assert run(image_path, tmp_path / "a", tiny_clip_dir, "--method", "naclip", "-O", "gaussian_std=0.5") == 0
    assert run(image_path, tmp_path / "b", tiny_clip_dir, "--method", "naclip") == 0
    a = json.loads((tmp_path / "a" / "x" / "result.json").read_text())
    b = json.loads((tmp_path / "b" / "x" / "result.json").read_text())
    assert [c["mean_score"] for c in a["classes"]] != [c["mean_score"] for c in b["classes"]]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "sclip", "-O", "gamma=3"], "Method 'sclip' does not take gamma"),
        (["--method", "naclip", "-O", "gaussian_std"], "expected KEY=VALUE"),
        (["--method", "sclip", "--mask-model", "/models/sam"], "Method 'sclip' does not take mask_options"),
    ],
)
def test_bad_method_options_are_one_line(image_path, tmp_path, tiny_clip_dir, capsys, extra, message):
    assert run(image_path, tmp_path / "o", tiny_clip_dir, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vocabseg: error:") and message in err[0]
    assert not (tmp_path / "o").exists()
