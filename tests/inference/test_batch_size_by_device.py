"""Windows per forward pass: by device unless given, and reported as run."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import vocabseg.segmenter
from vocabseg import Segmenter
from vocabseg.cli.main import main
from vocabseg.inference.config import WINDOWS_PER_FORWARD, InferenceConfig

SMALL = dict(short_side=64, crop=32, stride=16)


def test_cpu_and_gpu_resolve_differently():
    config = InferenceConfig()
    assert config.batch_size == 0  # "by device"
    cpu = config.for_device(torch.device("cpu")).batch_size
    cuda = config.for_device(torch.device("cuda:1")).batch_size  # no GPU needed: only the device type is read
    assert cpu == WINDOWS_PER_FORWARD["cpu"] and cuda == WINDOWS_PER_FORWARD["cuda"] == 16
    assert cpu != cuda and cpu >= 1


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
def test_an_explicit_batch_size_wins(device):
    assert InferenceConfig(batch_size=3).for_device(torch.device(device)).batch_size == 3


@pytest.fixture()
def batch_sizes(monkeypatch) -> list[int]:
    """The batch size each sliding-window call of the Segmenter was given."""
    seen = []
    real = vocabseg.segmenter.sliding_window_logits

    def spy(images, window_logits, crop, stride, batch_size, *args, **kwargs):
        seen.append(batch_size)
        return real(images, window_logits, crop, stride, batch_size, *args, **kwargs)

    monkeypatch.setattr(vocabseg.segmenter, "sliding_window_logits", spy)
    return seen


def test_segmenter_runs_and_reports_the_resolved_size(tiny_clip, rgb_image, batch_sizes):
    seg = Segmenter(method="sclip", model=tiny_clip, text_cache_dir=None, templates=["{}"], **SMALL)
    auto = seg.segment(rgb_image, "cat, dog")
    chosen = seg.segment(rgb_image, "cat, dog", batch_size=5)
    back_to_auto = seg.segment(rgb_image, "cat, dog", batch_size=0)
    cpu = WINDOWS_PER_FORWARD["cpu"]
    assert batch_sizes == [cpu, 5, cpu]
    assert [r.info["settings"]["batch_size"] for r in (auto, chosen, back_to_auto)] == [cpu, 5, cpu]
    assert seg.config.batch_size == cpu and seg.describe()["settings"]["batch_size"] == cpu

    fixed = Segmenter(method="sclip", model=tiny_clip, text_cache_dir=None, templates=["{}"], batch_size=7, **SMALL)
    assert fixed.segment(rgb_image, "cat, dog").info["settings"]["batch_size"] == 7
    # a config made elsewhere (an evaluation protocol) is resolved too
    fixed.predict_arrays([rgb_image], fixed.vocabulary("cat, dog"), InferenceConfig(**SMALL))
    assert batch_sizes[-2:] == [7, cpu]


def test_result_json_names_the_size_used(tmp_path, tiny_clip_dir, rgb_image, capsys):
    Image.fromarray(rgb_image).save(tmp_path / "a.png")
    model = ["--model", f"local-dir:{tiny_clip_dir}", "--method", "sclip", "--templates", "name"]
    for flags, want in (([], WINDOWS_PER_FORWARD["cpu"]), (["--batch-size", "3"], 3)):
        out = tmp_path / f"out{want}"
        assert main(["segment", str(tmp_path / "a.png"), "-c", "cat, dog", "-o", str(out), *model, *flags]) == 0
        assert json.loads((out / "a" / "result.json").read_text())["settings"]["batch_size"] == want
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    cpu = WINDOWS_PER_FORWARD["cpu"]
    assert f"0 picks it by device: {cpu} on cpu, 16 on cuda, 16 on mps" in " ".join(capsys.readouterr().out.split())
