"""What a MethodSpec says about a method, and the ``logits`` seam of the training-free methods recomputed by
hand: cosine of unit dense features with the text, centred padding, CLIP-Surgery, sigmoid scoring."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from vocabseg.errors import MethodOptionError
from vocabseg.eval.protocols import resolve_protocol
from vocabseg.inference.config import InferenceConfig
from vocabseg.inference.postprocess import class_probabilities
from vocabseg.methods import create_method, get_method_spec, list_methods
from vocabseg.methods.base import SegmentationMethod

TOL = dict(atol=1e-5, rtol=1e-5)


def unit_text(k: int = 4, d: int = 32, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(k, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def windows(*size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


# -- specs -------------------------------------------------------------------------------------------------------
def test_options_are_the_constructor_defaults():
    for name in list_methods():
        spec = get_method_spec(name)
        params = list(inspect.signature(spec.cls.__init__).parameters.values())[2:]  # self, clip
        assert dict(spec.options) == {p.name: p.default for p in params}, name
    assert dict(get_method_spec("proxyclip").options) == {
        "vfm": "dino_vitb8",
        "vfm_pretrained": "default",
        "gamma": 3.0,
        "beta": 1.2,
    }
    assert dict(get_method_spec("naclip").options) == {"gaussian_std": 5.0}
    assert dict(get_method_spec("sclip").options) == {}
    with pytest.raises(TypeError):
        get_method_spec("sclip").options["gamma"] = 1  # read-only


def test_spec_facts():
    assert get_method_spec("proxyclip").uses_vfm
    with_vfm = ("proxyclip", "corrclip", "trident")
    assert all(get_method_spec(n).uses_vfm for n in with_vfm)
    assert not any(get_method_spec(n).uses_vfm for n in list_methods() if n not in with_vfm)
    sclip = get_method_spec("sclip")
    assert sclip.paper is not None and "SCLIP" in sclip.paper.source
    assert sclip.paper.settings["voc21"]["logit_scale"] == 65.0
    assert not sclip.trainable and sclip.weights is None and sclip.text_input == "mean"
    assert sclip.templates == "openai80"
    assert get_method_spec("clip").paper is None
    bl = get_method_spec("beyond_labels")
    assert bl.trainable and bl.templates == "beyond_labels12" and bl.defaults.score == "sigmoid"
    assert bl.defaults.logit_scale == pytest.approx(1 / 0.08)
    assert bl.paper.settings["voc21"] == {"prob_threshold": 0.5}
    assert "vocabseg train" in bl.weights
    assert list_methods(trainable=True) == ["beyond_labels", "catseg", "fgaseg", "pixelclip", "vilseg"]
    assert "beyond_labels" not in list_methods(trainable=False)
    assert list_methods() == list_methods(trainable=False) + list_methods(trainable=True)  # training-free first


def test_paper_protocol_comes_from_the_spec():
    for name in list_methods():
        spec = get_method_spec(name)
        if spec.paper is None:
            continue
        for benchmark, settings in spec.paper.settings.items():
            background = "prob_threshold" in settings
            got = resolve_protocol("paper", name, benchmark, background).config
            assert got == spec.defaults.updated(**settings), (name, benchmark)
    bl = resolve_protocol("paper", "beyond_labels", "voc21", True).config
    assert (bl.score, bl.prob_threshold, bl.logit_scale) == ("sigmoid", 0.5, pytest.approx(12.5))


def test_unknown_options_are_refused_naming_the_accepted_ones(tiny_clip):
    with pytest.raises(MethodOptionError, match="'sclip' does not take gamma; it takes no options"):
        create_method("sclip", tiny_clip, gamma=1)
    with pytest.raises(MethodOptionError, match=r"does not take gama, x; it takes vfm='dino_vitb8'.*gamma=3\.0"):
        create_method("proxyclip", tiny_clip, gama=1, x=2)
    with pytest.raises(MethodOptionError, match="gaussian_std=5.0"):
        create_method("naclip", tiny_clip, sigma=3)
    method = create_method("naclip", tiny_clip, gaussian_std=2.0)
    assert method.method_options == {"gaussian_std": 2.0}
    assert create_method("naclip", tiny_clip).method_options == {"gaussian_std": 5.0}


# -- the logits seam ---------------------------------------------------------------------------------------------
def test_base_class_logits_must_be_overridden():
    with pytest.raises(NotImplementedError):
        SegmentationMethod().logits(torch.zeros(1, 3, 16, 16), unit_text())


@pytest.mark.parametrize("name", ["clip", "sclip", "naclip"])
def test_dense_logits_are_the_upsampled_cosine(tiny_clip, name):
    method = create_method(name, tiny_clip)
    x, text = windows(48, 80), unit_text()
    with torch.no_grad():
        dense = method(x)  # (2, 32, 3, 5)
        feats = dense / dense.norm(dim=1, keepdim=True)
        cos = (feats[:, None] * text[None, :, :, None, None]).sum(2)  # (2, K, 3, 5)
        want = F.interpolate(cos, size=(48, 80), mode="bilinear", align_corners=False)
        got = method.logits(x, text)
    assert dense.shape == (2, 32, 3, 5)
    assert got.shape == (2, 4, 48, 80)
    torch.testing.assert_close(got, want, **TOL)
    assert got.abs().max() <= 1.0 + 1e-6


def test_pad_multiple_pads_centred_and_crops_back(tiny_clip):
    method = create_method("sclip", tiny_clip)
    x, text = windows(48, 80), unit_text()
    # 48 x 80 -> 56 x 112: 8 rows (4 above, 4 below) and 32 columns (16 left, 16 right) of zeros
    padded = torch.zeros(2, 3, 56, 112)
    padded[:, :, 4:52, 16:96] = x
    with torch.no_grad():
        dense = F.normalize(method(padded), dim=1)  # (2, 32, 3, 7)
        cos = torch.einsum("bchw,kc->bkhw", dense, text)
        want = F.interpolate(cos, size=(56, 112), mode="bilinear", align_corners=False)[:, :, 4:52, 16:96]
        got = method.logits(x, text, pad_multiple=56)
        unpadded = method.logits(x, text)
    assert got.shape == (2, 4, 48, 80)
    torch.testing.assert_close(got, want, **TOL)
    assert (got - unpadded).abs().max() > 1e-3  # padding really changed the input
    with torch.no_grad():  # already a multiple: no padding at all
        torch.testing.assert_close(method.logits(x, text, pad_multiple=16), unpadded, atol=0, rtol=0)


def test_surgery_logits_by_hand(tiny_clip):
    method = create_method("clearclip", tiny_clip)
    x, text = windows(64, 48), unit_text(k=5)
    with torch.no_grad():
        dense, pooled = method(x, return_global=True)
        feats = F.normalize(dense, dim=1)
        cos = torch.einsum("bchw,kc->bkhw", feats, text)
        g = pooled / pooled.norm(dim=-1, keepdim=True)
        e = torch.exp(2.0 * g @ text.T)  # (B, K)
        w = e / e.sum(-1, keepdim=True)
        w = w / w.mean(-1, keepdim=True)
        weighted = cos * w[:, :, None, None]
        s = weighted - weighted.mean(1, keepdim=True)
        want = F.interpolate(s, size=(64, 48), mode="bilinear", align_corners=False)
        got = method.logits(x, text, surgery=True)
        plain = method.logits(x, text)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got.sum(1), torch.zeros(2, 64, 48), atol=1e-5, rtol=0)  # centred over classes
    assert (got - plain).abs().max() > 1e-3


# -- scores -----------------------------------------------------------------------------------------------------
def test_sigmoid_scores_with_synonyms_and_a_nameless_class():
    logits = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(0))
    name_to_class = [0, 1, 1, 2]  # class 1 has two names, class 3 (a threshold-only background) none
    probs = class_probabilities(logits, 12.5, name_to_class, 4, score="sigmoid")
    s = 1 / (1 + torch.exp(-12.5 * logits))
    assert probs.shape == (4, 5, 6)
    torch.testing.assert_close(probs[0], s[0])
    torch.testing.assert_close(probs[1], torch.maximum(s[1], s[2]))
    torch.testing.assert_close(probs[2], s[3])
    assert torch.all(probs[3] == 0)
    # independent per name: not a distribution over the names, unlike softmax
    assert (s.sum(0) - 1).abs().max() > 0.1
    soft = class_probabilities(logits, 12.5, name_to_class, 4)
    torch.testing.assert_close(soft[1], torch.maximum(*(12.5 * logits).softmax(0)[1:3]))
    # one name's score does not depend on the others
    changed = logits.clone()
    changed[3] += 5
    torch.testing.assert_close(class_probabilities(changed, 12.5, name_to_class, 4, score="sigmoid")[:2], probs[:2])


def test_unknown_score_is_refused():
    with pytest.raises(ValueError, match="score='tanh'"):
        InferenceConfig(score="tanh")
