"""Protocol presets: each method's published per-dataset settings, and the shared unified protocol."""

from __future__ import annotations

import pytest
from torch import nn

from vocabseg.errors import MethodOptionError, UnknownNameError
from vocabseg.eval.protocols import protocol_method_options, resolve_protocol
from vocabseg.inference.config import InferenceConfig
from vocabseg.methods import list_methods, register_method
from vocabseg.methods import registry as method_registry
from vocabseg.methods.registry import PaperSettings


def cfg(protocol, method, benchmark, background=False, **overrides):
    return resolve_protocol(protocol, method, benchmark, background, overrides).config


def test_paper_settings_per_dataset():
    # the papers' per-benchmark tables (SCLIP Tab. 1 settings, ClearCLIP, NACLIP, ProxyCLIP)
    c = cfg("paper", "sclip", "voc21", background=True)
    assert (c.short_side, c.crop, c.stride, c.logit_scale) == (336, 224, 112, 65.0)
    assert (c.prob_threshold, c.area_threshold, c.pamr_steps) == (0.1, 0.1, 0)
    assert cfg("paper", "sclip", "coco_stuff").short_side == 448
    assert cfg("paper", "sclip", "cityscapes").short_side == 560
    assert cfg("paper", "sclip", "context60", background=True).logit_scale == 50.0
    c = cfg("paper", "clearclip", "voc21", background=True)
    assert (c.short_side, c.crop, c.stride, c.logit_scale, c.prob_threshold) == (448, 448, 224, 50.0, 0.5)
    assert (cfg("paper", "clearclip", "cityscapes").crop, cfg("paper", "clearclip", "cityscapes").stride) == (224, 224)
    c = cfg("paper", "naclip", "voc20")
    assert (c.crop, c.pamr_steps, c.short_side) == (0, 10, 336)
    assert cfg("paper", "naclip", "coco_object", background=True).prob_threshold == 0.1
    c = cfg("paper", "proxyclip", "cityscapes")
    assert (c.short_side, c.crop, c.stride, c.pad_multiple) == (448, 224, 112, 56)
    assert cfg("paper", "proxyclip", "coco_object", background=True).prob_threshold == 0.25
    assert cfg("paper", "proxyclip", "ade847").short_side == 448
    # a dataset without background never gets a threshold
    assert cfg("paper", "proxyclip", "context59").prob_threshold == 0.0


def test_paper_protocol_states_its_source():
    p = resolve_protocol("paper", "proxyclip", "voc21", True)
    assert "ProxyCLIP" in p.source and "voc21" in p.source and p.label == "paper"
    assert "no published setting" in resolve_protocol("paper", "sclip", "ade847", False).source
    assert "no published per-benchmark protocol" in resolve_protocol("paper", "clip", "voc21", True).source


def test_unified_is_the_same_for_every_method():
    seen = set()
    for method in list_methods():
        c = cfg("unified", method, "ade150")
        seen.add((c.short_side, c.crop, c.stride, c.logit_scale, c.prob_threshold, c.area_threshold, c.pamr_steps))
    assert seen == {(336, 224, 112, 40.0, 0.0, 0.0, 0)}
    assert cfg("unified", "naclip", "voc21", background=True).prob_threshold == 0.1
    assert cfg("unified", "sclip", "cityscapes").short_side == 560
    assert cfg("unified", "proxyclip", "voc21", background=True).pad_multiple == 56  # the method's architecture


def test_overrides_are_applied_last_and_recorded():
    p = resolve_protocol("paper", "sclip", "voc21", True, {"short_side": 448, "crop": None})
    assert p.config.short_side == 448 and p.config.crop == 224 and p.config.logit_scale == 65.0
    assert p.overrides == {"short_side": 448} and p.label == "paper+overrides"
    assert resolve_protocol("default", "naclip", "voc21", True).config.pamr_steps == 10


def test_threshold_without_background_is_refused():
    with pytest.raises(ValueError, match="needs a background class"):
        resolve_protocol("unified", "sclip", "voc20", False, {"prob_threshold": 0.2})
    with pytest.raises(UnknownNameError, match="Did you mean 'paper'"):
        resolve_protocol("papers", "sclip", "voc20", False)


def test_paper_method_options_per_benchmark():
    assert protocol_method_options("paper", "trident", "cityscapes") == {"cos_fac": 3.0, "refine_neg_cos": False}
    assert protocol_method_options("paper", "trident", "voc20") == {"slide_stride": 112, "cos_fac": 0.0}
    assert protocol_method_options("paper", "trident", "voc21") == {}  # the constructor's defaults
    assert protocol_method_options("paper", "corrclip", "cityscapes") == {"slide_crop": 224}
    assert protocol_method_options("paper", "cliper", "coco_stuff") == {"softmax_scale": 50.0}
    assert protocol_method_options("paper", "sclip", "cityscapes") == {}
    assert protocol_method_options("paper", "clip", "cityscapes") == {}  # no paper settings at all
    for protocol in ("unified", "default"):
        assert protocol_method_options(protocol, "trident", "cityscapes") == {}
    with pytest.raises(UnknownNameError, match="Did you mean 'paper'"):
        protocol_method_options("papers", "trident", "cityscapes")


def test_paper_options_are_checked_at_registration(monkeypatch):
    monkeypatch.setattr(method_registry, "_METHODS", dict(method_registry._METHODS))

    class Toy(nn.Module):
        def __init__(self, clip: nn.Module, gamma: float = 1.0):
            super().__init__()

    paper = PaperSettings("toy configs", {}, {"voc21": {"gamma": 2.0}, "cityscapes": {"gama": 2.0}})
    with pytest.raises(MethodOptionError, match="paper options for cityscapes: Method 'toy' does not take gama; "):
        register_method("toy", defaults=InferenceConfig(), summary="s", reference="r", paper=paper)(Toy)
    assert "toy" not in list_methods()
    paper = PaperSettings("toy configs", {}, {"voc21": {"gamma": 2.0}})
    register_method("toy", defaults=InferenceConfig(), summary="s", reference="r", paper=paper)(Toy)
    assert protocol_method_options("paper", "toy", "voc21") == {"gamma": 2.0}
