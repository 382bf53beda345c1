"""ProxyCLIP's padded windows: the logits of the padded window are cropped back at the padding offset.

A window whose sides are not multiples of ``pad_multiple`` (56) is zero-padded centred, run whole,
and its logits cut back to the window. Cropping at the wrong offset keeps the output's shape, so
the Segmenter's probabilities are compared with a literal recomputation instead.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from conftest import make_tiny_vfm

from vocabseg import Segmenter

TEMPLATES = ["a photo of a {}."]


def test_padded_window_is_cropped_at_its_centred_offset(tiny_clip):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(45, 75, 3), dtype=np.uint8)
    image[:, :30, 0] = 250  # some structure, so that a shifted crop could not match by chance
    seg = Segmenter(
        method="proxyclip",
        model=tiny_clip,
        vfm=make_tiny_vfm(),
        text_cache_dir=None,
        templates=TEMPLATES,
        short_side=0,  # keep the size: the one window is the whole 45 x 75 image
        crop=0,
        logit_scale=30,
    )
    assert seg.config.pad_multiple == 56
    names = ["red thing", "blue thing", "grey thing"]
    res = seg.segment(image, ", ".join(names))

    mean = torch.tensor(tiny_clip.visual.image_mean).view(3, 1, 1)
    std = torch.tensor(tiny_clip.visual.image_std).view(3, 1, 1)
    x = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std
    # 45 -> 56: 11 rows, 5 above and 6 below; 75 -> 112: 37 columns, 18 left and 19 right
    padded = torch.zeros(1, 3, 56, 112)
    padded[0, :, 5:50, 18:93] = x
    text = seg.text_encoder.encode(names)
    with torch.no_grad():
        feats = F.normalize(seg.method(padded), dim=1)
    cos = torch.einsum("bchw,kc->bkhw", feats, text)
    cos = F.interpolate(cos, size=(56, 112), mode="bilinear", align_corners=False)
    want = (30 * cos[0, :, 5:50, 18:93]).softmax(dim=0)

    np.testing.assert_allclose(res.probs, want.numpy(), atol=1e-5)
    np.testing.assert_array_equal(res.labels, want.argmax(0).numpy())
    # the check has teeth: a crop from the corner gives other probabilities
    corner = (30 * cos[0, :, :45, :75]).softmax(dim=0)
    assert not np.allclose(res.probs, corner.numpy(), atol=1e-3)
