"""``vocabseg serve`` options, its model factory, and the lazy web imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vocabseg.cli.main import build_parser, main
from vocabseg.cli.serve import segmenter_factory
from vocabseg.serve import ServeConfig, require_web


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_defaults_bind_to_loopback():
    args = parse()
    assert (args.host, args.port, args.workers, args.queue_size, args.max_upload_mb) == ("127.0.0.1", 7860, 1, 8, 20.0)
    assert args.method == "proxyclip" and args.methods is None


def test_factory_uses_the_model_flags_and_gives_the_vfm_only_to_proxyclip(tiny_clip_dir):
    args = parse("--model", f"local-dir:{tiny_clip_dir}", "--vfm", "dino_vitb8", "--short-side", "64", "--crop", "32",
                 "--stride", "16")  # fmt: skip
    segmenter = segmenter_factory(args)("sclip")  # would raise "does not use a VFM" if --vfm were passed on
    assert segmenter.spec.name == "sclip"
    assert (segmenter.config.short_side, segmenter.config.crop) == (64, 32)
    assert segmenter.clip.name == f"local-dir:{tiny_clip_dir}"


def test_factory_gives_the_weights_only_to_the_trained_method(tiny_clip_dir):
    args = parse("--method", "beyond_labels", "--weights", "none", "--model", f"local-dir:{tiny_clip_dir}")
    create = segmenter_factory(args)
    with pytest.warns(UserWarning, match="RANDOM"):
        trained = create("beyond_labels")
    assert trained.spec.trainable and trained.describe()["weights"].startswith("random")
    assert create("sclip").spec.name == "sclip"  # would raise "takes no weights" if --weights were passed on


def test_unloadable_default_method_fails_before_serving(tiny_clip_dir, capsys):
    pytest.importorskip("gradio", reason="the web extra is not installed")
    code = main(["serve", "--method", "proxyclip", "--model", f"local-dir:{tiny_clip_dir}", "--port", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Method 'proxyclip' is unavailable here" in err and "dino_vitb8" in err


def test_missing_web_extra_is_one_clear_message(monkeypatch, capsys):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"pip install 'vocabseg\[web\]'"):
        require_web()
    assert main(["serve", "--method", "sclip"]) == 2
    assert "pip install 'vocabseg[web]'" in capsys.readouterr().err


def test_core_imports_without_the_web_packages():
    code = (
        "import sys, vocabseg, vocabseg.serve, vocabseg.cli.main as m; m.build_parser(); "
        "loaded = {'gradio', 'fastapi', 'uvicorn', 'starlette'} & set(sys.modules); "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bad_server_settings_are_a_message(capsys):
    assert main(["serve", "--method", "sclip", "--workers", "0"]) == 2
    assert "Invalid server setting(s): workers=0" in capsys.readouterr().err


def test_config_is_checked_and_printed():
    with pytest.raises(ValueError, match="workers=0"):
        ServeConfig(workers=0)
    with pytest.raises(ValueError, match="queue_size=-1"):
        ServeConfig(queue_size=-1)
    text = ServeConfig(max_upload_bytes=1000, max_pixels=2_000_000, workers=2, queue_size=3).limits_text()
    assert text == (
        "upload limit 1,000 bytes, image limit 2,000,000 pixels, at most 100 classes and 200 names "
        "(200 characters each), 300 s per request; 2 worker(s), queue of 3"
    )
