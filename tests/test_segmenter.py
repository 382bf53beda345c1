"""The Segmenter front door: its pipeline against a step-by-step recomputation, batching, options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_vfm
from PIL import Image

from vocabseg import Segmenter, Vocabulary, WeightsUnavailableError
from vocabseg.methods import create_method

SMALL = dict(short_side=64, crop=32, stride=16)


@pytest.fixture(scope="module")
def seg(tiny_clip):
    return Segmenter(method="sclip", model=tiny_clip, text_cache_dir=None, **SMALL)


def test_pipeline_equals_step_by_step_recomputation(tiny_clip, rgb_image):
    """Whole-image inference, recomputed by hand: normalise, resize short side, dense features,
    cosine with the prompt-ensembled text, upsample to the original size, softmax, argmax."""
    seg = Segmenter(method="clearclip", model=tiny_clip, text_cache_dir=None, short_side=64, crop=0, logit_scale=50)
    res = seg.segment(rgb_image, "red thing, blue thing; azure thing, green thing")
    mean = torch.tensor(tiny_clip.visual.image_mean).view(3, 1, 1)
    std = torch.tensor(tiny_clip.visual.image_std).view(3, 1, 1)
    x = (torch.from_numpy(rgb_image).permute(2, 0, 1).float() / 255 - mean) / std
    x = F.interpolate(x[None], size=(64, 90), mode="bilinear", align_corners=False)  # 50x70 -> short side 64
    with torch.no_grad():
        feats = F.normalize(create_method("clearclip", clip=tiny_clip)(x), dim=1)
    text = seg.text_encoder.encode(["red thing", "blue thing", "azure thing", "green thing"])
    logits = torch.einsum("bchw,kc->bkhw", feats, text)
    logits = F.interpolate(logits, size=(64, 90), mode="bilinear", align_corners=False)
    logits = F.interpolate(logits, size=(50, 70), mode="bilinear", align_corners=False)[0]
    p = (50 * logits).softmax(0)
    want = torch.stack([p[0], torch.maximum(p[1], p[2]), p[3]])
    np.testing.assert_allclose(res.probs, want.numpy(), atol=1e-5)
    np.testing.assert_array_equal(res.labels, want.argmax(0).numpy())
    assert res.classes == ["red thing", "blue thing", "green thing"]
    assert res.labels.shape == (50, 70) and res.labels.dtype == np.int32
    assert res.probs.shape == (3, 50, 70) and res.probs.dtype == np.float32


def test_images_of_different_sizes_in_one_call(seg, rgb_image):
    other = np.ascontiguousarray(rgb_image[:33, :61])
    together = seg.segment([rgb_image, other], "cat, dog, sofa")
    alone = [seg.segment(rgb_image, "cat, dog, sofa"), seg.segment(other, "cat, dog, sofa")]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
        np.testing.assert_array_equal(a.labels, b.labels)
    assert together[1].labels.shape == (33, 61)


def test_batch_size_does_not_change_the_result(tiny_clip, rgb_image):
    one = Segmenter(method="naclip", model=tiny_clip, text_cache_dir=None, batch_size=1, pamr_steps=2, **SMALL)
    many = Segmenter(method="naclip", model=tiny_clip, text_cache_dir=None, batch_size=64, pamr_steps=2, **SMALL)
    np.testing.assert_allclose(one.segment(rgb_image, "a, b").probs, many.segment(rgb_image, "a, b").probs, atol=1e-5)


def test_background_names_and_threshold(seg, rgb_image):
    res = seg.segment(rgb_image, "cat, dog", background="sky; wall")
    assert res.classes == ["cat", "dog", "background"] and res.background_index == 2
    assert res.synonyms[2] == ["sky", "wall"]
    thr = seg.segment(rgb_image, "cat, dog", prob_threshold=0.6)
    assert thr.classes == ["cat", "dog", "background"]
    assert np.all(thr.probs[2] == 0)  # threshold-only background: no text, probability 0
    low = thr.probs[:2].max(0) < 0.6
    assert low.any() and (~low).any()  # the test is meaningful: both cases occur
    np.testing.assert_array_equal(thr.labels[low], 2)
    np.testing.assert_array_equal(thr.labels[~low], thr.probs[:2].argmax(0)[~low])


def test_per_call_overrides_and_options_change_results(seg, tiny_clip, rgb_image):
    base = seg.segment(rgb_image, "cat, dog, sofa")
    assert not np.allclose(base.probs, seg.segment(rgb_image, "cat, dog, sofa", pamr_steps=3).probs)
    assert not np.allclose(base.probs, seg.segment(rgb_image, "cat, dog, sofa", logit_scale=10).probs)
    surgery = Segmenter(method="sclip", model=tiny_clip, text_cache_dir=None, surgery=True, **SMALL)
    assert not np.allclose(base.probs, surgery.segment(rgb_image, "cat, dog, sofa").probs)
    assert base.info["settings"]["crop"] == 32 and base.info["method"] == "sclip"


def test_proxyclip_with_a_vfm_module(tiny_clip, rgb_image):
    seg = Segmenter(method="proxyclip", model=tiny_clip, vfm=make_tiny_vfm(), text_cache_dir=None, **SMALL)
    res = seg.segment(rgb_image, Vocabulary.parse("cat, dog"))
    assert res.labels.shape == (50, 70)
    assert seg.config.pad_multiple == 56  # the method's default travelled into the segmenter


def test_misuse_is_reported_clearly(tiny_clip):
    with pytest.raises(ValueError, match="does not use a VFM"):
        Segmenter(method="sclip", model=tiny_clip, vfm="dino_vitb8")
    with pytest.raises(ValueError, match="not supported"):
        Segmenter(method="sclip", model=tiny_clip, dtype="float16")
    with pytest.raises(KeyError, match="Did you mean 'sclip'"):
        Segmenter(method="sclipp", model=tiny_clip)
    with pytest.raises(WeightsUnavailableError, match="dino_vitb8"):  # offline: no silent random VFM
        Segmenter(method="proxyclip", model=tiny_clip)


def test_named_local_model_and_save(tiny_clip_dir, rgb_image, tmp_path):
    seg = Segmenter(method="clip", model=f"local-dir:{tiny_clip_dir}", text_cache_dir=tmp_path / "cache", **SMALL)
    res = seg.segment(rgb_image, "cat, dog; puppy, sofa")
    paths = res.save(tmp_path / "out")
    mask = Image.open(paths["mask"])
    assert mask.mode == "P"
    np.testing.assert_array_equal(np.asarray(mask), res.labels)
    overlay = Image.open(paths["overlay"])
    assert overlay.height >= 50 and overlay.width > 70  # legend to the right (may extend a tiny image)
    np.testing.assert_array_equal(np.asarray(overlay)[:50, :70], np.asarray(res.overlay_image(legend=False)))
    data = json.loads(paths["json"].read_text())
    assert [c["name"] for c in data["classes"]] == ["cat", "dog", "sofa"]
    assert data["classes"][1]["names"] == ["dog", "puppy"]
    assert sum(c["pixels"] for c in data["classes"]) == 50 * 70
    for c in data["classes"]:
        mask_c = res.labels == c["index"]
        assert c["pixels"] == int(mask_c.sum())
        if c["pixels"]:
            assert c["mean_score"] == pytest.approx(float(res.probs[c["index"]][mask_c].mean()), rel=1e-5)
    assert data["method"] == "clip" and data["settings"]["short_side"] == 64
    assert not list((tmp_path / "out").glob("*.tmp"))  # atomic writes leave nothing behind
