"""`vocabseg segment` on degenerate images: every image of a batch gets its outputs or one message line,
the exit code follows the batch convention (0 all done, 1 some skipped), and result.json is strict JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vocabseg.cli.main import main
from vocabseg.segmenter import Segmenter


@pytest.fixture()
def model_args(tiny_clip_dir):
    """The issue's reproduction (R) on the tiny model, with the method's published settings."""
    return ["--model", f"local-dir:{tiny_clip_dir}", "--pretrained", "none", "--vfm-pretrained", "none",
            "--method", "sclip", "--templates", "name"]  # fmt: skip


def refuse_constant(name: str):
    raise ValueError(f"result.json holds the non-standard constant {name}")


def write(path, array):
    Image.fromarray(array).save(path)
    return path


def read_result(folder):
    return json.loads((folder / "result.json").read_text(), parse_constant=refuse_constant)


@pytest.mark.parametrize("shape", [(10000, 3), (3, 10000), (20000, 1)])
def test_thin_image_and_normal_image_both_segmented(tmp_path, rgb_image, model_args, capsys, shape):
    rng = np.random.default_rng(0)
    thin = write(tmp_path / "thin.png", rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8))
    normal = write(tmp_path / "normal.png", rgb_image)
    out = tmp_path / "out"
    code = main(["segment", str(thin), str(normal), "-c", "cat, dog", "-o", str(out), *model_args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert code == 0
    assert "2 of 2 image(s) segmented" in captured.err
    for name, size in (("thin", shape), ("normal", (50, 70))):
        assert np.asarray(Image.open(out / name / "mask.png")).shape == size
        data = read_result(out / name)
        assert (data["height"], data["width"]) == size
        assert sum(c["pixels"] for c in data["classes"]) == size[0] * size[1]


def test_short_side_below_a_patch(tmp_path, rgb_image, model_args, capsys):
    img = write(tmp_path / "x.png", rgb_image)
    out = tmp_path / "out"
    assert main(["segment", str(img), "-c", "cat, dog", "-o", str(out), "--short-side", "8", *model_args]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert read_result(out / "x")["settings"]["short_side"] == 8


def test_an_image_failing_unexpectedly_is_skipped_with_one_line(tmp_path, rgb_image, model_args, capsys, monkeypatch):
    """A failure inside the model for one image (a stand-in for a bug) is reported for that image only."""
    original = Segmenter.predict_arrays

    def predict_arrays(self, arrays, *args, **kwargs):
        if any(a.min() == a.max() for a in arrays):
            raise RuntimeError("boom: uniform image")
        return original(self, arrays, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "predict_arrays", predict_arrays)
    bad = write(tmp_path / "flat.png", np.full((30, 30, 3), 9, dtype=np.uint8))
    good = write(tmp_path / "good.png", rgb_image)
    out = tmp_path / "out"
    code = main(["segment", str(bad), str(good), "-c", "cat, dog", "-o", str(out), *model_args])
    captured = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in captured.out + captured.err
    assert f"1 failed:\n  {bad}: segmentation failed (RuntimeError: boom: uniform image)\n" in captured.err
    assert "1 of 2 image(s) segmented" in captured.err
    assert (out / "good" / "mask.png").is_file() and read_result(out / "good")["width"] == 70
    assert not (out / "flat").exists()
