"""The command line end to end, on images the tests make, with the tiny model in a local-dir folder."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vocabseg.cli.main import main


@pytest.fixture()
def model_args(tiny_clip_dir):
    return ["--model", f"local-dir:{tiny_clip_dir}", "--method", "sclip", "--short-side", "64", "--crop", "32",
            "--stride", "16"]  # fmt: skip


def write_image(path, rgb_image):
    Image.fromarray(rgb_image).save(path)
    return path


def test_segment_writes_outputs(tmp_path, rgb_image, model_args, capsys):
    a = write_image(tmp_path / "a.png", rgb_image)
    b = write_image(tmp_path / "sub_b.jpg", rgb_image[:40, :50])
    out = tmp_path / "out"
    code = main(["segment", str(a), str(b), "-c", "cat, dog; puppy", "--background", "sky; wall", "-o", str(out),
                 *model_args])  # fmt: skip
    assert code == 0
    for name, shape in (("a", (50, 70)), ("sub_b", (40, 50))):
        assert np.asarray(Image.open(out / name / "mask.png")).shape == shape
        data = json.loads((out / name / "result.json").read_text())
        assert [c["name"] for c in data["classes"]] == ["cat", "dog", "background"]
        assert data["image"].endswith(f"{name}.png" if name == "a" else "sub_b.jpg")
    assert "2 of 2 image(s) segmented" in capsys.readouterr().err


def test_one_bad_file_does_not_lose_the_others(tmp_path, rgb_image, model_args, capsys):
    good = write_image(tmp_path / "good.png", rgb_image)
    bad = tmp_path / "bad.png"
    bad.write_text("definitely not a png")
    same_stem = tmp_path / "other"
    same_stem.mkdir()
    good2 = write_image(same_stem / "good.png", rgb_image)
    out = tmp_path / "out"
    code = main(["segment", str(bad), str(good), str(good2), "-c", "cat, dog", "-o", str(out), *model_args])
    assert code == 1
    err = capsys.readouterr().err
    assert "bad.png: not an image" in err and "2 of 3 image(s)" in err
    assert (out / "good" / "mask.png").is_file() and (out / "good_1" / "mask.png").is_file()
    assert not (out / "bad").exists()


def test_classes_file_and_prob_threshold(tmp_path, rgb_image, model_args):
    classes = tmp_path / "classes.txt"
    classes.write_text("cat; kitten\ndog, puppy\n")
    img = write_image(tmp_path / "x.png", rgb_image)
    out = tmp_path / "out"
    assert main(["segment", str(img), "--classes-file", str(classes), "--prob-threshold", "0.9", "-o", str(out),
                 *model_args]) == 0  # fmt: skip
    data = json.loads((out / "x" / "result.json").read_text())
    assert [c["names"] for c in data["classes"]] == [["cat", "kitten"], ["dog", "puppy"], []]
    assert data["settings"]["prob_threshold"] == 0.9


@pytest.mark.parametrize(
    "classes, message",
    [("", "class list is empty"), ("cat,,dog", "Empty class name"), ("cat, Cat", "Duplicate class name")],
)
def test_bad_classes_exit_2_with_a_message(tmp_path, rgb_image, model_args, capsys, classes, message):
    img = write_image(tmp_path / "x.png", rgb_image)
    assert main(["segment", str(img), "-c", classes, "-o", str(tmp_path / "o"), *model_args]) == 2
    assert message in capsys.readouterr().err


def test_missing_weights_exit_2_with_instructions(tmp_path, rgb_image, capsys):
    img = write_image(tmp_path / "x.png", rgb_image)
    assert main(["segment", str(img), "-c", "cat", "--method", "sclip", "--model", "ViT-B-16"]) == 2
    err = capsys.readouterr().err
    assert "Could not load pretrained weights for ViT-B-16" in err and "--pretrained none" in err


def test_too_large_image_is_skipped_with_the_limit(tmp_path, rgb_image, model_args, capsys):
    img = write_image(tmp_path / "x.png", rgb_image)
    assert main(["segment", str(img), "-c", "cat", "--max-pixels", "1000", "-o", str(tmp_path / "o"),
                 *model_args]) == 1  # fmt: skip
    assert "above the limit of 1,000 pixels" in capsys.readouterr().err


def test_methods_lists_every_method_with_defaults(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("clip", "maskclip", "sclip", "clearclip", "naclip", "proxyclip"):
        assert f"\n{name} " in out
    assert "10x[8, 16]" in out  # NACLIP's PAMR default
    assert "vfm='dino_vitb8'" in out


def test_console_script_is_installed():
    run = subprocess.run([sys.executable, "-m", "vocabseg", "--help"], capture_output=True, text=True, check=True)
    assert "segment" in run.stdout and "methods" in run.stdout
    run = subprocess.run([sys.executable, "-m", "vocabseg", "segment", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--classes" in run.stdout and "--pretrained" in run.stdout


@pytest.mark.parametrize(
    "extra, message", [(["--images-per-batch", "0"], "images-per-batch"), (["--stride", "0"], "stride=0")]
)
def test_invalid_settings_are_one_error_line(tmp_path, rgb_image, model_args, capsys, extra, message):
    image = write_image(tmp_path / "a.png", rgb_image)
    assert main(["segment", str(image), "-c", "cat", "-o", str(tmp_path / "out"), *model_args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vocabseg: error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
