"""End-to-end overrides (CLIP-Surgery, logit scale, PAMR) give exactly the probabilities their equations say.

Each case runs the Segmenter on one whole window at the image's own size (no resize, no sliding),
so the expected probabilities follow from the method's dense features by the equations alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vocabseg import Segmenter
from vocabseg.inference.pamr import PAMR

NAMES = ["red thing", "blue thing", "grey thing"]
ONE_WINDOW = dict(short_side=0, crop=0, text_cache_dir=None, templates=["a photo of a {}."])


def make_image(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 80, size=(height, width, 3), dtype=np.uint8)
    image[:, : width // 2, 0] += 170
    image[height // 2 :, :, 2] += 170
    return image


def normalized(clip: torch.nn.Module, image: np.ndarray) -> torch.Tensor:
    mean = torch.tensor(clip.visual.image_mean).view(3, 1, 1)
    std = torch.tensor(clip.visual.image_std).view(3, 1, 1)
    return ((torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std)[None]


def cosine_logits(seg: Segmenter, x: torch.Tensor) -> torch.Tensor:
    """(1, K, H, W) cosine of the unit dense features with the unit text, upsampled to the image."""
    with torch.no_grad():
        feats = F.normalize(seg.method(x), dim=1)
    cos = torch.einsum("bchw,kc->bkhw", feats, seg.text_encoder.encode(NAMES))
    return F.interpolate(cos, size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_surgery_follows_the_clip_surgery_equations(tiny_clip):
    """CLIP Surgery (``clip_feature_surgery``): class weights from the *unit* global image embedding,
    element-wise image x text products weighted per class, minus their class mean, summed over dims."""
    image = make_image(64, 64)  # the tiny CLIP's native size, so encode_image gives the global embedding
    seg = Segmenter(method="sclip", model=tiny_clip, surgery=True, logit_scale=20, **ONE_WINDOW)
    res = seg.segment(image, ", ".join(NAMES))

    x = normalized(tiny_clip, image)
    text = seg.text_encoder.encode(NAMES)  # (K, E), unit
    with torch.no_grad():
        f = F.normalize(seg.method(x), dim=1)[0]  # (E, h, w)
        g = F.normalize(tiny_clip.encode_image(x), dim=-1)[0]  # (E,)
    prob = (2 * (g @ text.T)).softmax(dim=-1)  # (K,)
    w = prob / prob.mean()
    products = f[None] * text[:, :, None, None] * w[:, None, None, None]  # (K, E, h, w)
    s = (products - products.mean(dim=0, keepdim=True)).sum(dim=1)  # (K, h, w)
    s = F.interpolate(s[None], size=(64, 64), mode="bilinear", align_corners=False)[0]
    want = (20 * s).softmax(dim=0)

    np.testing.assert_allclose(res.probs, want.numpy(), atol=1e-5)
    np.testing.assert_array_equal(res.labels, want.argmax(0).numpy())
    assert res.info["surgery"] is True


@pytest.mark.parametrize("logit_scale", [3.0, 70.0])
def test_logit_scale_is_the_softmax_temperature(tiny_clip, logit_scale):
    image = make_image(40, 56)
    seg = Segmenter(method="clearclip", model=tiny_clip, **ONE_WINDOW)
    res = seg.segment(image, ", ".join(NAMES), logit_scale=logit_scale)
    want = (logit_scale * cosine_logits(seg, normalized(tiny_clip, image))[0]).softmax(dim=0)
    np.testing.assert_allclose(res.probs, want.numpy(), atol=1e-5)
    assert res.info["settings"]["logit_scale"] == logit_scale


def test_pamr_on_and_off_equal_the_pamr_module_on_the_same_logits(tiny_clip):
    image = make_image(40, 56)
    seg = Segmenter(method="naclip", model=tiny_clip, logit_scale=40, **ONE_WINDOW)
    x = normalized(tiny_clip, image)
    logits = cosine_logits(seg, x)

    off = seg.segment(image, ", ".join(NAMES), pamr_steps=0)
    np.testing.assert_allclose(off.probs, (40 * logits[0]).softmax(dim=0).numpy(), atol=1e-5)

    on = seg.segment(image, ", ".join(NAMES), pamr_steps=3, pamr_dilations=(1, 2))
    refined = PAMR(3, (1, 2))(x, logits)  # PAMR sees the CLIP-normalised image, as NACLIP's code does
    want = (40 * refined[0]).softmax(dim=0)
    np.testing.assert_allclose(on.probs, want.numpy(), atol=1e-5)
    np.testing.assert_array_equal(on.labels, want.argmax(0).numpy())
    assert not np.allclose(on.probs, off.probs, atol=1e-3)  # refinement really changed something
    other = (40 * PAMR(3, (8, 16))(x, logits)[0]).softmax(dim=0)
    assert not np.allclose(on.probs, other.numpy(), atol=1e-3)  # and the dilations asked for were used
