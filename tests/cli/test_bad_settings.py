"""`vocabseg segment` with invalid settings or environment: one line naming the option, exit 2, no model load."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import vocabseg.segmenter
from vocabseg.cli.main import main
from vocabseg.inference.config import MAX_PAD_MULTIPLE

# random weights and one template: nothing to download, and nothing is loaded before the checks anyway
R = ["--pretrained", "none", "--vfm-pretrained", "none", "--method", "sclip", "--templates", "name"]

BAD = [  # (arguments, what the message must say besides "vocabseg: error:")
    (["--crop", "-5"], ["--crop", "an integer >= 0"]),
    (["--stride", "0"], ["--stride", "an integer > 0"]),
    (["--stride", "-1"], ["--stride", "an integer > 0"]),
    (["--short-side", "-10"], ["--short-side", "an integer >= 0"]),
    (["--prob-threshold", "nan"], ["--prob-threshold", "from 0 (off) to 1"]),
    (["--prob-threshold", "-0.5"], ["--prob-threshold", "from 0 (off) to 1"]),
    (["--prob-threshold", "1e9"], ["--prob-threshold", "from 0 (off) to 1"]),
    (["--logit-scale", "nan"], ["--logit-scale", "a finite number > 0"]),
    (["--logit-scale", "-1"], ["--logit-scale", "a finite number > 0"]),
    (["--logit-scale", "inf"], ["--logit-scale", "a finite number > 0"]),
    (["--batch-size", "-1"], ["--batch-size", "an integer >= 0"]),
    (["--pamr-dilations", "0"], ["--pamr-dilations", "integers > 0"]),
    (["--max-pixels", "0"], ["--max-pixels", "positive number of pixels"]),
    (["--max-pixels", "-1"], ["--max-pixels", "positive number of pixels"]),
    (["--pad-multiple", "5000"], ["--pad-multiple", f"from 0 (off) to {MAX_PAD_MULTIPLE}"]),
    (["--crop", "100", "--stride", "200"], ["stride=200 (--stride) must not exceed crop=100 (--crop)"]),
    (["--device", "cuda"], ["--device", "no CUDA GPU"]),
    (["--device", "tpu9"], ["--device", "cpu, cuda, cuda:N or mps"]),
    (["--dtype", "float16"], ["--dtype", "not supported on the CPU", "float32"]),
    (["--vfm", "dino_vitb8"], ["--vfm", "'sclip' does not use a VFM", "proxyclip"]),
    (["--pretrained", "{tmp}/missing.pt"], ["--pretrained", "{tmp}/missing.pt", "not found"]),
    (["--model", "local-dir:{tmp}/missing"], ["--model", "{tmp}/missing does not exist"]),
    (["-o", "{tmp}/a-file"], ["--out", "{tmp}/a-file is an existing file"]),
    (["-o", "{tmp}/a-file/sub"], ["--out", "{tmp}/a-file is a file"]),
]


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail loudly if anything builds a model: every check must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(vocabseg.segmenter, "load_clip", refuse)
    monkeypatch.setattr(vocabseg.segmenter, "create_method", refuse)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # "no GPU" on any machine


@pytest.mark.parametrize("args, expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_setting_is_one_line_exit_2_before_any_model(tmp_path, rgb_image, capsys, no_model_load, args, expected):
    Image.fromarray(rgb_image).save(tmp_path / "x.png")
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "out"
    argv = ["segment", str(tmp_path / "x.png"), "-c", "cat, dog", "-o", str(out), *R]
    argv += [a.format(tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vocabseg: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text.format(tmp=tmp_path) in err
    assert not out.exists()  # nothing was written


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write into read-only folders")
def test_unwritable_output_folder(tmp_path, rgb_image, capsys, no_model_load):
    Image.fromarray(rgb_image).save(tmp_path / "x.png")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert main(["segment", str(tmp_path / "x.png"), "-c", "cat", "-o", str(locked / "out"), *R]) == 2
    finally:
        locked.chmod(0o700)
    assert f"{locked} is not writable" in capsys.readouterr().err


def test_the_process_prints_no_traceback(tmp_path, rgb_image):
    """The real process, for the case that used to end in a ValueError traceback."""
    Image.fromarray(rgb_image).save(tmp_path / "x.png")
    argv = ["segment", str(tmp_path / "x.png"), "-c", "cat, dog", "-o", str(tmp_path / "o"), *R, "--dtype", "float16"]
    proc = subprocess.run([sys.executable, "-m", "vocabseg.cli.main", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "vocabseg: error: dtype='float16' (--dtype) is not supported on the CPU (fp16 kernels are missing, bf16 is "
        "~10x slower than fp32): use float32 on the CPU, float16/bfloat16 on a GPU."
    ]
