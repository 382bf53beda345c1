"""Trident: the spliced, SAM-aggregated features vs. a literal re-computation (per-crop, per-head loops,
hand-written softmax, explicit relative positions and masks), SAM's last-block attention vs. timm's
block, batching, options, errors and the Segmenter end to end."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_sam, make_tiny_vfm, softmax

from vocabseg import Segmenter
from vocabseg.errors import MethodOptionError, UnknownNameError, WeightsUnavailableError
from vocabseg.methods import create_method, get_method_spec
from vocabseg.methods.trident import (
    sam_input_size,
    sam_last_attention,
    sam_last_block_input,
    snapped_size,
)
from vocabseg.models.vfm import TimmVFM

TOL = dict(atol=1e-5, rtol=1e-5)
SIZES = [(64, 64), (48, 80), (96, 64)]  # square, wide, tall (multiples of the patch, >= the crop)
SMALL = dict(slide_crop=32, slide_stride=16)  # 2x2-patch crops of the tiny CLIP


@pytest.fixture(scope="module")
def tiny_sam() -> torch.nn.Module:
    return make_tiny_sam()


def build(tiny_clip, vfm, sam, **options):
    return create_method("trident", clip=tiny_clip, vfm=vfm, sam=sam, **{**SMALL, **options}).eval()


# ----------------------------------------------------------------------------------------------------------------
# reference: the equations, one image, one crop and one head at a time
# ----------------------------------------------------------------------------------------------------------------
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def to_imagenet(clip, image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(clip.visual.image_mean).view(3, 1, 1)
    std = torch.tensor(clip.visual.image_std).view(3, 1, 1)
    return (image * std + mean - IMAGENET_MEAN) / IMAGENET_STD


def ref_boxes(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """mmseg's windows along one axis."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return [(max(min(i * stride + crop, size) - crop, 0), min(i * stride + crop, size)) for i in range(n)]


def ref_clip_block_input(clip, image: torch.Tensor):
    """(1+N, D) input of the last block for one crop at CLIP's native size (no position resize)."""
    v = clip.visual
    x = F.conv2d(image[None], v.conv1.weight, stride=v.conv1.stride)[0]
    d, gh, gw = x.shape
    n = int(math.sqrt(v.positional_embedding.shape[0] - 1))
    pos = v.positional_embedding
    if (gh, gw) != (n, n):
        grid = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic")
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])
    x = v.ln_pre(torch.cat([v.class_embedding[None], x.reshape(d, -1).T]) + pos)[None]
    for block in v.transformer.resblocks[:-1]:
        x = block(x)
    return x[0], (gh, gw)


def ref_stage1(clip, vfm, crops: list[torch.Tensor], gamma: float, beta: float) -> list[torch.Tensor]:
    """ProxyCLIP's last block per crop, one mean of S over all crops of the image: (D, h', w') each."""
    feats = [vfm(to_imagenet(clip, c)[None])[0] for c in crops]
    sims = []
    for e in feats:
        e = F.normalize(e.reshape(e.shape[0], -1), dim=0)
        sims.append(e.T @ e)
    mean = sum(s.sum() for s in sims) / sum(s.numel() for s in sims)
    block = clip.visual.transformer.resblocks[-1]
    heads, d = block.attn.num_heads, clip.visual.conv1.out_channels
    hd = d // heads
    outs = []
    for crop, e, s in zip(crops, feats, sims):
        x, grid = ref_clip_block_input(clip, crop)
        a = gamma * (s - beta * mean)
        a[a < 0] = float("-inf")
        attn = softmax(a)
        values = (block.ln_1(x) @ block.attn.in_proj_weight.T + block.attn.in_proj_bias)[1:, 2 * d :]
        per_head = []
        for h in range(heads):
            vg = values[:, h * hd : (h + 1) * hd].T.reshape(1, hd, *grid)
            vg = F.interpolate(vg, size=e.shape[-2:], mode="bilinear", align_corners=False)[0]
            per_head.append(attn @ vg.reshape(hd, -1).T)
        o = block.attn.out_proj
        y = torch.cat(per_head, dim=-1) @ o.weight.T + o.bias  # (M', D)
        outs.append(y.T.reshape(d, *e.shape[-2:]))
    return outs


def ref_sam_attention(sam, image_imnet: torch.Tensor, size: tuple[int, int]):
    """Per-head attention probabilities (N, N) and values (N, d) of SAM's last block, by loops."""
    x = F.pad(image_imnet[None], (0, 128 - size[1], 0, 128 - size[0]))
    x = sam.patch_embed(x) + sam.pos_embed
    for block in sam.blocks[:-1]:
        x = block(x)
    block = sam.blocks[-1]
    _, gh, gw, c = x.shape
    n, heads = gh * gw, block.attn.num_heads
    hd = c // heads
    qkv = block.norm1(x).reshape(n, c) @ block.attn.qkv.weight.T + block.attn.qkv.bias
    ys, xs = torch.arange(n) // gw, torch.arange(n) % gw
    probs, values = [], []
    for h in range(heads):
        q = qkv[:, h * hd : (h + 1) * hd]
        k = qkv[:, c + h * hd : c + (h + 1) * hd]
        v = qkv[:, 2 * c + h * hd : 2 * c + (h + 1) * hd]
        logits = torch.zeros(n, n)
        for i in range(n):
            rh = block.attn.rel_pos_h[ys[i] - ys + gh - 1]  # (N, d): the embedding of each offset
            rw = block.attn.rel_pos_w[xs[i] - xs + gw - 1]
            logits[i] = (k @ q[i]) / math.sqrt(hd) + rh @ q[i] + rw @ q[i]
        probs.append(softmax(logits))
        values.append(v)
    return probs, values, (gh, gw)


def ref_trident(clip, vfm, sam, image, gamma=3.0, beta=1.2, cos_fac=1.2, refine_neg_cos=True, crop=32, stride=16):
    """Trident's dense features (E, h_s, w_s) for one CLIP-normalised image whose sides are multiples of
    the patch and at least the crop."""
    _, height, width = image.shape
    patch = clip.visual.conv1.kernel_size[0]
    boxes = [(y, x) for y in ref_boxes(height, crop, stride) for x in ref_boxes(width, crop, stride)]
    crops = [image[:, y1:y2, x1:x2] for (y1, y2), (x1, x2) in boxes]
    outs = ref_stage1(clip, vfm, crops, gamma, beta)
    r = outs[0].shape[-1] // (crop // patch)
    spliced = torch.zeros(outs[0].shape[0], height // patch * r, width // patch * r)
    count = torch.zeros(spliced.shape[1:])
    for ((y1, y2), (x1, x2)), y in zip(boxes, outs):
        assert y.shape[1:] == ((y2 - y1) // patch * r, (x2 - x1) // patch * r)
        for i in range(y.shape[1]):
            for j in range(y.shape[2]):
                spliced[:, y1 // patch * r + i, x1 // patch * r + j] += y[:, i, j]
                count[y1 // patch * r + i, x1 // patch * r + j] += 1
    spliced = spliced / count

    scale = 128 / max(height, width)
    sh, sw = int(height * scale + 0.5), int(width * scale + 0.5)
    resized = F.interpolate(image[None], size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)[0]
    probs, values, (gh, gw) = ref_sam_attention(sam, to_imagenet(clip, resized), (sh, sw))
    vh, vw = sh // 16, sw // 16
    valid = [y * gw + x for y in range(vh) for x in range(vw)]
    m, heads = len(valid), len(probs)
    cos = []
    for v in values:
        c = torch.zeros(m, m)
        for a, i in enumerate(valid):
            for b, j in enumerate(valid):
                c[a, b] = v[i] @ v[j] / (v[i].norm() * v[j].norm())
        cos.append(c)
    weights = torch.zeros(m, m)
    for a in range(m):
        tau = cos_fac * sum(c[a].mean() for c in cos) / heads
        if not refine_neg_cos and tau < 0:
            tau = torch.tensor(0.6)
        tau = min(tau, torch.tensor(0.9))
        for p, c in zip(probs, cos):
            for b, j in enumerate(valid):
                if c[a, b] > tau:
                    weights[a, b] += p[valid[a], j] / heads
    weights = weights / weights.sum(-1, keepdim=True)

    grid_feats = F.interpolate(spliced[None], size=(vh, vw), mode="bilinear", align_corners=False)[0]
    aggregated = weights @ grid_feats.reshape(grid_feats.shape[0], -1).T
    feats = clip.visual.ln_post(aggregated) @ clip.visual.proj
    return feats.T.reshape(-1, vh, vw)


# ----------------------------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_features_match_the_literal_recomputation(size, tiny_clip, tiny_vfm, tiny_sam):
    """Two images in one batch (each compared alone), the patch-8 VFM (spliced at 2x the CLIP grid)."""
    images = torch.randn(2, *(3, *size), generator=torch.Generator().manual_seed(3))
    method = build(tiny_clip, tiny_vfm, tiny_sam)
    with torch.no_grad():
        got = method(images)
        for b in range(2):
            torch.testing.assert_close(got[b], ref_trident(tiny_clip, tiny_vfm, tiny_sam, images[b]), **TOL)


@pytest.mark.parametrize(
    "options",
    [dict(gamma=2.0, beta=1.0, cos_fac=-1.0, refine_neg_cos=False), dict(cos_fac=4.0)],
    ids=["negative-tau-to-0.6", "tau-capped-at-0.9"],
)
def test_options_match_the_literal_recomputation(options, tiny_clip, tiny_sam):
    """A patch-16 VFM (same grid as CLIP), other crops, γ, β, and thresholds that hit the 0.6 and 0.9 rules
    (the tiny SAM's mean value cosines are about -0.14 to 0.28)."""
    vfm16 = make_tiny_vfm(patch=16)
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    method = build(tiny_clip, vfm16, tiny_sam, slide_crop=48, slide_stride=32, **options)
    with torch.no_grad():
        got = method(images)[0]
        want = ref_trident(tiny_clip, vfm16, tiny_sam, images[0], crop=48, stride=32, **options)
    torch.testing.assert_close(got, want, **TOL)


def test_refine_neg_cos_changes_negative_thresholds(tiny_clip, tiny_vfm, tiny_sam):
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        kept = build(tiny_clip, tiny_vfm, tiny_sam, cos_fac=-1.0)(images)
        raised = build(tiny_clip, tiny_vfm, tiny_sam, cos_fac=-1.0, refine_neg_cos=False)(images)
    assert (kept - raised).abs().max() > 1e-4


def test_sam_last_attention_reproduces_timms_block(tiny_sam):
    """Our probabilities and values, through the block's projection, residuals and MLP, are timm's block
    output; the input path is timm's forward_features (up to the neck)."""
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    block = tiny_sam.blocks[-1]
    with torch.no_grad():
        x = sam_last_block_input(tiny_sam, images)
        torch.testing.assert_close(tiny_sam.neck(block(x).permute(0, 3, 1, 2)), tiny_sam.forward_features(images))
        probs, values = sam_last_attention(block, x)
        b, gh, gw, c = x.shape
        mixed = (probs @ values).transpose(1, 2).reshape(b, gh, gw, c)
        y = x + block.attn.proj(mixed)
        y = y + block.mlp(block.norm2(y))
        torch.testing.assert_close(y, block(x), **TOL)
        torch.testing.assert_close(probs.sum(-1), torch.ones(b, 2, gh * gw))
        block.attn.use_rel_pos = False
        try:
            no_rel = sam_last_attention(block, x)[0]
        finally:
            block.attn.use_rel_pos = True
    assert (no_rel - probs).abs().max() > 1e-3  # the relative positions are in use


def test_geometry_follows_the_official_preprocessing():
    assert snapped_size(64, 96, 16, 32) == (64, 96)  # already in patches, no smaller than the crop
    assert snapped_size(50, 70, 16, 32) == (64, 80)  # long side 70 -> 80, short 57 -> 64
    assert snapped_size(448, 597, 16, 336) == (464, 608)  # 448·608/597 = 456.25 -> 456 -> 464
    assert snapped_size(32, 32, 16, 48) == (48, 48)  # never below the crop
    assert sam_input_size(448, 597, 1024) == (768, 1024)
    assert sam_input_size(48, 80, 128) == (77, 128)
    assert sam_input_size(3, 10000, 1024) == (1, 1024)  # at least one pixel


# ----------------------------------------------------------------------------------------------------------------
# the seam, options, errors
# ----------------------------------------------------------------------------------------------------------------
def unit_text(clip, k: int = 3) -> torch.Tensor:
    return F.normalize(
        torch.randn(k, clip.text_projection.shape[1], generator=torch.Generator().manual_seed(0)), dim=-1
    )


def test_logits_are_the_upsampled_cosine_and_a_batch_equals_its_images(tiny_clip, tiny_vfm, tiny_sam):
    method = build(tiny_clip, tiny_vfm, tiny_sam)
    text = unit_text(tiny_clip)
    windows = torch.randn(3, 3, 50, 70, generator=torch.Generator().manual_seed(6))  # not in whole patches
    with torch.no_grad():
        together = method.logits(windows, text)
        alone = torch.cat([method.logits(windows[i : i + 1], text) for i in range(3)])
        feats = F.normalize(method(windows), dim=1)
    torch.testing.assert_close(together, alone, **TOL)
    assert together.shape == (3, 3, 50, 70)
    want = F.interpolate(torch.einsum("bchw,kc->bkhw", feats, text), size=(50, 70), mode="bilinear")
    torch.testing.assert_close(together, want, **TOL)


@pytest.mark.parametrize(
    "option", [dict(gamma=2.0), dict(beta=1.0), dict(cos_fac=0.0), dict(slide_stride=32), dict(slide_crop=48)]
)
def test_options_change_the_output(option, tiny_clip, tiny_vfm, tiny_sam):
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        base = build(tiny_clip, tiny_vfm, tiny_sam)(images)
        changed = build(tiny_clip, tiny_vfm, tiny_sam, **option)(images)
    assert (base - changed).abs().max() > 1e-4, option


def test_spec(tiny_clip):
    spec = get_method_spec("trident")
    assert spec.uses_vfm  # --vfm / --vfm-pretrained reach it
    assert spec.defaults.crop == 0 and spec.defaults.short_side == 448 and spec.defaults.logit_scale == 40.0
    assert spec.options["vfm"] == "dino_vitb16" and spec.options["sam"] == "sam_vitb"
    assert (spec.options["slide_crop"], spec.options["slide_stride"], spec.options["cos_fac"]) == (336, 224, 1.2)
    assert spec.paper.settings["cityscapes"] == {"short_side": 688}
    assert spec.paper.settings["voc21"] == {"prob_threshold": 0.2}


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(slide_crop=40), r"slide_crop must be a positive multiple of the CLIP patch size \(16\), got 40"),
        (dict(slide_stride=64), r"slide_stride must be .* to slide_crop \(32\), got 64"),
        (dict(slide_stride=8), r"slide_stride must be .* got 8"),
        (dict(cos_fac=float("nan")), r"cos_fac must be a finite number, got nan"),
        (dict(refine_neg_cos="no"), r"refine_neg_cos must be True or False, got 'no'"),
    ],
)
def test_bad_options_are_refused_by_name(option, message, tiny_clip, tiny_vfm, tiny_sam):
    with pytest.raises(MethodOptionError, match=message):
        build(tiny_clip, tiny_vfm, tiny_sam, **option)


def test_sam_must_be_a_sam_encoder(tiny_clip, tiny_vfm):
    with pytest.raises(MethodOptionError, match=r"sam must be a SAM image encoder .* got TimmVFM"):
        build(tiny_clip, tiny_vfm, tiny_vfm)  # a DINO, not a SAM
    with pytest.raises(MethodOptionError, match="last block must use global attention"):
        build(tiny_clip, tiny_vfm, make_tiny_sam(window_last=True))
    with pytest.raises(UnknownNameError, match="sam_vitz"):
        build(tiny_clip, tiny_vfm, "sam_vitz")


def test_sam_weights_missing(tiny_clip, tiny_vfm, tmp_path):
    missing = tmp_path / "sam.pth"
    with pytest.raises(WeightsUnavailableError, match=rf"sam_pretrained='{missing}'.*not found"):
        build(tiny_clip, tiny_vfm, "sam_vitb", sam_pretrained=str(missing))
    with pytest.raises(
        WeightsUnavailableError, match=r"trident: SAM 'sam_vitb'.*HF_HUB_OFFLINE is set(.|\n)*sam_pretrained="
    ):
        build(tiny_clip, tiny_vfm, "sam_vitb")  # offline: no silent random SAM


def test_wrapped_sam_global_embedding_and_surgery_refused(tiny_clip, tiny_vfm, tiny_sam):
    images = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        plain = build(tiny_clip, tiny_vfm, tiny_sam)(images)
        wrapped = build(tiny_clip, tiny_vfm, TimmVFM(tiny_sam, fixed_size=128))(images)
    torch.testing.assert_close(plain, wrapped, rtol=0, atol=0)
    # the global embedding is CLIP's image embedding (encode_image takes the native 64 px only)
    square = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        dense, pooled = build(tiny_clip, tiny_vfm, tiny_sam)(square, return_global=True)
        torch.testing.assert_close(dense, build(tiny_clip, tiny_vfm, tiny_sam)(square), rtol=0, atol=0)
    torch.testing.assert_close(pooled, tiny_clip.encode_image(square), **TOL)
    with pytest.raises(MethodOptionError, match=r"trident does not take surgery=True \(--surgery\)"):
        build(tiny_clip, tiny_vfm, tiny_sam).logits(images, unit_text(tiny_clip), surgery=True)


def test_segmenter_end_to_end(tiny_clip, tiny_vfm, tiny_sam, rgb_image, tmp_path):
    """The whole resized image is one window (crop 0); the sub-images are cut inside the method."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = Segmenter(
            method="trident",
            model=tiny_clip,
            vfm=tiny_vfm,
            method_kwargs=dict(sam=tiny_sam, **SMALL),
            text_cache_dir=None,
            short_side=64,
        )
    assert seg.config.crop == 0
    seen = []
    logits = seg.method.logits
    seg.method.logits = lambda windows, *a, **k: seen.append(tuple(windows.shape)) or logits(windows, *a, **k)
    res = seg.segment(rgb_image, "cat, dog, sofa")
    assert seen == [(1, 3, 64, 90)]  # the 50x70 image at short side 64, whole
    assert res.labels.shape == rgb_image.shape[:2] and res.probs.shape == (3, *rgb_image.shape[:2])
    assert np.isfinite(res.probs).all()
    np.testing.assert_allclose(res.probs.sum(0), 1.0, atol=1e-5)
    assert res.save(tmp_path)["json"].exists()
