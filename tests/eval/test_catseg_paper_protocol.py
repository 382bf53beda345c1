"""``--protocol paper`` for a method evaluated as CAT-Seg is (CAT-Seg, FGAseg): the sliding-window
settings of ``vocabseg.inference.published`` on each benchmark of CAT-Seg's table, and detectron2's
``SemSegEvaluator`` convention for the headline. The method here is a registered fake with the SCLIP
defaults, so every CAT-Seg value must come from the paper protocol."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

from vocabseg import Segmenter
from vocabseg.cli.main import main
from vocabseg.data import build_dataset
from vocabseg.data.registry import CATSEG_BENCHMARKS, get_dataset_spec
from vocabseg.data.synthetic import write_synthetic
from vocabseg.eval.protocols import resolve_protocol
from vocabseg.eval.records import run_identity
from vocabseg.eval.runner import evaluate
from vocabseg.inference.config import LATER_SETTINGS, InferenceConfig
from vocabseg.inference.published import CATSEG_CONVENTION, CATSEG_EVAL, CATSEG_PAPER_SETTINGS
from vocabseg.methods import registry as method_registry
from vocabseg.methods.base import SegmentationMethod
from vocabseg.methods.registry import PaperSettings, register_method

PROBE = "catseg_probe"


class Probe(SegmentationMethod):
    """Per-name logits from the window's pixels and the text: low-resolution, upsampled to the window."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3, clip.text_projection.shape[1], generator=g))

    def logits(self, windows, text, *, pad_multiple=0, surgery=False):
        x = F.avg_pool2d(windows.float(), 8)
        low = torch.einsum("bchw,cd,kd->bkhw", x, self.proj, text) * 3
        return F.interpolate(low, size=windows.shape[-2:], mode="bilinear", align_corners=False)


@pytest.fixture()
def probe(monkeypatch):
    monkeypatch.setattr(method_registry, "_METHODS", dict(method_registry._METHODS))
    paper = PaperSettings("CAT-Seg eval.sh (sliding window)", CATSEG_PAPER_SETTINGS, convention=CATSEG_CONVENTION)
    register_method(PROBE, defaults=InferenceConfig(), summary="s", reference="r", paper=paper)(Probe)
    yield PROBE
    monkeypatch.delattr(Probe, "method_name")


@pytest.mark.parametrize("benchmark", CATSEG_BENCHMARKS)
def test_paper_selects_the_catseg_evaluation_and_convention(probe, benchmark):
    has_background = get_dataset_spec(benchmark).classes.background is not None
    assert has_background == (benchmark == "voc20b")
    paper = resolve_protocol("paper", probe, benchmark, has_background)
    assert paper.config == InferenceConfig(**CATSEG_EVAL)  # no threshold on PAS-20b: its names compete
    assert paper.convention == "detectron2" and benchmark in paper.source and paper.label == "paper"
    for other in ("default", "unified"):
        resolved = resolve_protocol(other, probe, benchmark, has_background)
        assert resolved.convention == "mmseg" and resolved.config.square_size == 0
    assert resolve_protocol("default", probe, benchmark, has_background).config == InferenceConfig()


def test_methods_without_a_stated_convention_keep_mmseg():
    assert resolve_protocol("paper", "sclip", "ade150", False).convention == "mmseg"
    assert resolve_protocol("paper", "beyond_labels", "voc21", True).convention == "mmseg"


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", ["context59", "voc20b"])  # (A-847's 847 names take a minute on a CPU)
def test_evaluation_runs_the_protocol_with_detectron2_headline(probe, benchmark, tmp_path, tiny_clip):
    ds = build_dataset(benchmark, write_synthetic(benchmark, tmp_path, num_images=2, size=(48, 64), seed=3))
    seg = Segmenter(method=Probe(tiny_clip), model=tiny_clip, text_cache_dir=None, templates=["{}"])
    result = evaluate(seg, ds, protocol="paper", progress=False, out_dir=tmp_path / "out")
    info = result.info
    assert info["convention"] == "detectron2" and result.metrics == result.all_metrics["detectron2"]
    assert {k: info["settings"][k] for k in CATSEG_EVAL} == dict(CATSEG_EVAL)
    assert "CAT-Seg eval.sh" in info["protocol"]["source"]
    if benchmark == "context59":  # classes predicted that the labels lack: the conventions differ
        assert result.metrics["mIoU"] > result.all_metrics["mmseg"]["mIoU"]
    assert "detectron2" in (result.run_dir / "result.md").read_text()
    mmseg = evaluate(seg, ds, protocol="paper", convention="mmseg", progress=False)
    assert mmseg.metrics == mmseg.all_metrics["mmseg"] and torch.equal(mmseg.accumulator, result.accumulator)


def test_the_command_line_takes_the_papers_convention(probe, tmp_path, tiny_clip_dir, capsys):
    write_synthetic("voc20b", tmp_path / "data", num_images=1, nested=True)
    args = ["eval", "-b", "voc20b", "--data-root", str(tmp_path / "data"), "--method", probe, "-o", str(tmp_path / "o"),
            "--model", f"local-dir:{tiny_clip_dir}", "--templates", "name", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "(paper, detectron2)" in capsys.readouterr().out
    assert main([*args, "--convention", "mmseg"]) == 0
    assert "(paper, mmseg)" in capsys.readouterr().out


def test_new_settings_at_their_defaults_leave_run_identities_as_they_were(tmp_path, tiny_clip):
    ds = build_dataset("voc20", write_synthetic("voc20", tmp_path, num_images=1))
    seg = Segmenter(method="sclip", model=tiny_clip, text_cache_dir=None, templates=["{}"])
    plain = run_identity(seg, ds, seg.config)["settings"]
    assert not set(LATER_SETTINGS) & set(plain)
    assert set(plain) == {f.name for f in fields(InferenceConfig)} - set(LATER_SETTINGS) - {"batch_size"}
    catseg = run_identity(seg, ds, seg.config.updated(**CATSEG_EVAL))["settings"]
    assert {k: catseg[k] for k in LATER_SETTINGS} == {k: CATSEG_EVAL[k] for k in LATER_SETTINGS}
