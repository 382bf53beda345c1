"""CLIPer (``cliper``) against a literal re-computation of its steps, written the slow, obvious way:
per-head loops over the blocks' attention maps, hand-written softmax, Sinkhorn rounds and column
means, sliding crops cut in pixels with the official grid formula, one image at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import softmax

from vocabseg import Segmenter
from vocabseg.errors import MethodOptionError
from vocabseg.methods import create_method, get_method_spec
from vocabseg.methods.cliper import fused_attention

TOL = dict(atol=1e-5, rtol=1e-5)
SIZES = [(64, 64), (48, 80), (96, 64)]  # native grid, wide, tall
PATCH = 16  # the tiny CLIP's


# ----------------------------------------------------------------------------------------------------------------
# reference implementation
# ----------------------------------------------------------------------------------------------------------------


def unit(a: torch.Tensor) -> torch.Tensor:
    return a / a.norm(dim=-1, keepdim=True)


def ref_positional(pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """The official code's: patch positions resized bilinearly to the grid (no (g + 0.1) / g factor)."""
    n = int(math.sqrt(pos.shape[0] - 1))
    grid = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])


def ref_head_slices(attn, part: int):
    """Per head: rows of the fused in-projection for q (part 0), k (1) or v (2)."""
    d = attn.in_proj_weight.shape[1]
    hd = d // attn.num_heads
    rows = [slice(part * d + i * hd, part * d + (i + 1) * hd) for i in range(attn.num_heads)]
    return [(attn.in_proj_weight[r], attn.in_proj_bias[r]) for r in rows], hd


def ref_attention_maps(attn, x_ln: torch.Tensor) -> list[torch.Tensor]:
    """softmax(QKᵀ/√d) of every head, over all tokens."""
    qs, hd = ref_head_slices(attn, 0)
    ks, _ = ref_head_slices(attn, 1)
    return [softmax((x_ln @ wq.T + bq) @ (x_ln @ wk.T + bk).T / math.sqrt(hd)) for (wq, bq), (wk, bk) in zip(qs, ks)]


def ref_layers(clip, image: torch.Tensor):
    """One image -> the layer features [LN1_1(X_1), ..., LN1_{L-1}(X_{L-1}), X_L], per-head Σ_i A_i, grid."""
    v = clip.visual
    x = F.conv2d(image[None], v.conv1.weight, stride=v.conv1.stride)[0]
    d, gh, gw = x.shape
    x = torch.cat([v.class_embedding[None], x.reshape(d, gh * gw).T])
    x = v.ln_pre(x + ref_positional(v.positional_embedding, gh, gw))
    feats, sums = [], None
    for block in v.transformer.resblocks[:-1]:
        x_ln = block.ln_1(x)
        feats.append(x_ln)
        maps = ref_attention_maps(block.attn, x_ln)
        sums = maps if sums is None else [s + m for s, m in zip(sums, maps)]
        x = block(x[None])[0]
    feats.append(x)
    return feats, sums, (gh, gw)


def ref_sinkhorn(s: torch.Tensor) -> torch.Tensor:
    s = s / s.sum(0, keepdim=True)  # every column sums to 1
    return s / s.sum(1, keepdim=True)  # then every row


def ref_fuse(s: torch.Tensor) -> torch.Tensor:
    t = s.shape[0]
    m = (s + s.T) / 2
    column_means = torch.stack([m[:, j].sum() / t for j in range(t)])
    m = m - column_means[None, :]
    m = torch.where(m > 0, m, torch.zeros_like(m))
    return m / m.sum(1, keepdim=True)


def ref_encode(clip, image: torch.Tensor):
    """Per-layer dense features [(N, E)], the head mean of the last fused attention over patches, grid."""
    feats, sums, grid = ref_layers(clip, image)
    block = clip.visual.transformer.resblocks[-1]
    vs, _ = ref_head_slices(block.attn, 2)
    outs = []
    for layer, f in enumerate(feats):
        fused = []
        for s in sums:
            for _ in range(layer + 1):  # layer k (0-based) sees k+1 Sinkhorn rounds (official in-place)
                s = ref_sinkhorn(s)
            fused.append(ref_fuse(s))
        f_ln = block.ln_1(f)
        heads = [a @ (f_ln @ wv.T + bv) for a, (wv, bv) in zip(fused, vs)]
        o = block.attn.out_proj
        y = torch.cat(heads, dim=-1) @ o.weight.T + o.bias  # no residual, no FFN
        outs.append(clip.visual.ln_post(y[1:]) @ clip.visual.proj)
    mean_attn = sum(a[1:, 1:] for a in fused) / len(fused)
    return outs, mean_attn, grid


def ref_logits(outs, prompts, scale):
    return [scale * unit(o) @ prompts.T for o in outs]  # (N, P) per layer


def ref_slide(clip, image, prompts, scale, crop, stride):
    """The sliding views' logits per layer (N, P), propagated with the stitched attention."""
    _, h, w = image.shape
    gh, gw = h // PATCH, w // PATCH
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    preds, count = None, torch.zeros(gh, gw)
    attn, overlaps = torch.zeros(gh, gw, gh, gw), torch.zeros(gh, gw, gh, gw)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            outs, a, (ch, cw) = ref_encode(clip, image[:, y1:y2, x1:x2])
            logits = ref_logits(outs, prompts, scale)
            if preds is None:
                preds = [torch.zeros(gh, gw, prompts.shape[0]) for _ in logits]
            ty, tx = y1 // PATCH, x1 // PATCH
            for p, lg in zip(preds, logits):
                p[ty : ty + ch, tx : tx + cw] += lg.reshape(ch, cw, -1)
            count[ty : ty + ch, tx : tx + cw] += 1
            attn[ty : ty + ch, tx : tx + cw, ty : ty + ch, tx : tx + cw] += a.reshape(ch, cw, ch, cw)
            overlaps[ty : ty + ch, tx : tx + cw, ty : ty + ch, tx : tx + cw] += 1
    attn = (attn / (overlaps + 1e-5)).reshape(gh * gw, gh * gw)
    attn = attn / attn.sum(1, keepdim=True)
    return [torch.einsum("ip,ij->jp", (p / count[..., None]).reshape(gh * gw, -1), attn) for p in preds]


def ref_cliper(clip, image, text, thr=0.2, scale=100.0, crop=224, stride=112, select=-1):
    """CLIPer's output (K, h, w) for one image."""
    k = text.shape[0]
    prompts = unit(torch.cat([text, text.mean(0, keepdim=True)]))
    outs, mean_attn, grid = ref_encode(clip, image)
    probs = [softmax(lg)[:, :k] for lg in ref_logits(outs, prompts, scale)]
    if crop:
        slide = ref_slide(clip, image, prompts, scale, crop, stride)
        probs = [0.5 * softmax(s)[:, :k] + 0.5 * p for s, p in zip(slide, probs)]
    selected = probs[select].clone()
    for name in range(k):
        column = selected[:, name]
        column[column < thr * column.max()] = 0
    probs[select] = selected
    out = torch.einsum("it,ij->jt", selected, mean_attn) + sum(probs) / len(probs)
    return out.T.reshape(k, *grid)


# ----------------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------------
def unit_text(k: int = 3, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(k, 32, generator=torch.Generator().manual_seed(seed)), dim=-1)


def images(*size: int, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


OPTIONS = {
    "global": dict(slide_crop=0),
    "slide32": dict(slide_crop=32, slide_stride=16),
    "slide48": dict(slide_crop=48, slide_stride=16),
    "options": dict(slide_crop=48, slide_stride=32, attention_thr=0.5, softmax_scale=50.0, select_layer=0),
}
REF_ARGS = dict(
    attention_thr="thr", softmax_scale="scale", slide_crop="crop", slide_stride="stride", select_layer="select"
)


@pytest.mark.parametrize("options", list(OPTIONS), ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_scores_match_reference(size, options, tiny_clip):
    method = create_method("cliper", tiny_clip, **OPTIONS[options])
    x, text = images(*size), unit_text()
    kwargs = {REF_ARGS[k]: v for k, v in OPTIONS[options].items()}
    with torch.no_grad():
        got = method.scores(x, text)
        for b in range(len(x)):  # batched == per-image reference (no cross-image mixing)
            want = ref_cliper(tiny_clip, x[b], text, **kwargs)
            assert got[b].shape == want.shape == (3, size[0] // PATCH, size[1] // PATCH)
            torch.testing.assert_close(got[b], want, **TOL)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dense_features_are_the_last_layer_and_global_is_clip(size, tiny_clip):
    x = images(*size)
    with torch.no_grad():
        dense, pooled = create_method("cliper", tiny_clip)(x, return_global=True)
        for b in range(len(x)):
            outs, _, grid = ref_encode(tiny_clip, x[b])
            torch.testing.assert_close(dense[b], outs[-1].T.reshape(-1, *grid), **TOL)
        if size == (64, 64):
            torch.testing.assert_close(pooled, tiny_clip.encode_image(x), **TOL)


def test_logits_are_the_log_of_the_upsampled_scores(tiny_clip):
    """Windows are resized to the nearest multiple of the patch (50x70 -> 48x64), the scores upsampled
    back and logged, so softmax(logits) over the names is the scores normalised per pixel."""
    method = create_method("cliper", tiny_clip)
    x, text = images(50, 70), unit_text()
    with torch.no_grad():
        got = method.logits(x, text)
        scores = method.scores(F.interpolate(x, size=(48, 64), mode="bilinear", align_corners=False), text)
    want = F.interpolate(scores, size=(50, 70), mode="bilinear", align_corners=False)
    assert got.shape == (2, 3, 50, 70)
    torch.testing.assert_close(got, want.log(), **TOL)
    torch.testing.assert_close(got.softmax(1), want / want.sum(1, keepdim=True), **TOL)


def test_pad_multiple_pads_centred_and_crops_back(tiny_clip):
    method = create_method("cliper", tiny_clip)
    x, text = images(48, 80), unit_text()
    with torch.no_grad():
        got = method.logits(x, text, pad_multiple=64)  # -> 64x128, padding (24, 24) x (8, 8)
        want = method.logits(F.pad(x, (24, 24, 8, 8)), text)[:, :, 8:56, 24:104]
    torch.testing.assert_close(got, want, **TOL)


def test_batched_equals_one_by_one(tiny_clip):
    method = create_method("cliper", tiny_clip, slide_crop=32, slide_stride=16)
    x, text = images(48, 80, n=3), unit_text(4)
    with torch.no_grad():
        together = method.logits(x, text)
        alone = torch.cat([method.logits(x[i : i + 1], text) for i in range(3)])
    torch.testing.assert_close(together, alone, **TOL)


@pytest.mark.parametrize(
    "option",
    [
        dict(attention_thr=0.6),
        dict(softmax_scale=30.0),
        dict(slide_crop=0),
        dict(slide_crop=48, slide_stride=32),
        dict(select_layer=0),
    ],
    ids=lambda o: ",".join(o),
)
def test_options_change_the_output(option, tiny_clip):
    x, text = images(64, 96), unit_text()
    with torch.no_grad():
        default = create_method("cliper", tiny_clip, slide_crop=32, slide_stride=16).logits(x, text)
        changed = create_method("cliper", tiny_clip, **{"slide_crop": 32, "slide_stride": 16, **option})
        assert (changed.logits(x, text) - default).abs().max() > 1e-3


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(attention_thr=1.5), r"attention_thr must be a number in \[0, 1\], got 1\.5"),
        (dict(softmax_scale=0), "softmax_scale must be a number > 0, got 0"),
        (dict(slide_crop=8), r"slide_crop must be 0 \(no sliding views\) or an integer >= the patch size \(16\)"),
        (
            dict(slide_crop=64, slide_stride=96),
            "slide_stride must be an integer from the patch size .16. to slide_crop",
        ),
        (dict(select_layer=3), "select_layer must be an integer from -3 to 2 .this CLIP has 3 layers., got 3"),
    ],
)
def test_bad_options_are_refused(option, message, tiny_clip):
    with pytest.raises(MethodOptionError, match=message):
        create_method("cliper", tiny_clip, **option)


def test_surgery_is_refused(tiny_clip):
    with pytest.raises(MethodOptionError, match=r"cliper does not take surgery=True \(--surgery\)"):
        create_method("cliper", tiny_clip).logits(images(64, 64), unit_text(), surgery=True)


def test_fused_attention_normalises_rows_and_keeps_an_emptied_row_on_its_diagonal():
    s = torch.rand(2, 3, 7, 7, generator=torch.Generator().manual_seed(0))
    a = fused_attention(s / s.sum(-1, keepdim=True))
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 7))
    assert (a == 0).any()  # entries below their column's mean are cut
    uniform = torch.full((4, 4), 0.25)  # every entry equals its column's mean: the clamp empties every row
    torch.testing.assert_close(fused_attention(uniform), torch.eye(4))


def test_registered_defaults():
    spec = get_method_spec("cliper")
    assert (spec.defaults.short_side, spec.defaults.crop, spec.defaults.logit_scale) == (336, 0, 1.0)
    assert dict(spec.options) == dict(
        attention_thr=0.2, softmax_scale=100.0, slide_crop=224, slide_stride=112, select_layer=-1
    )
    assert spec.paper.settings["cityscapes"] == {"short_side": 560}


def test_segmenter_end_to_end(tiny_clip, rgb_image):
    """Whole-image window (crop 0), logit scale 1: the probabilities are CLIPer's output normalised
    over the names (max-merged per class), at the image's size."""
    seg = Segmenter(method="cliper", model=tiny_clip, text_cache_dir=None, short_side=64)
    assert (seg.config.crop, seg.config.logit_scale) == (0, 1.0)
    res = seg.segment(rgb_image, "red thing, blue thing; azure thing, green thing")
    mean = torch.tensor(tiny_clip.visual.image_mean).view(3, 1, 1)
    std = torch.tensor(tiny_clip.visual.image_std).view(3, 1, 1)
    x = (torch.from_numpy(rgb_image).permute(2, 0, 1).float() / 255 - mean) / std
    x = F.interpolate(x[None], size=(64, 90), mode="bilinear", align_corners=False)  # 50x70 -> short side 64
    text = seg.text_encoder.encode(["red thing", "blue thing", "azure thing", "green thing"])
    with torch.no_grad():
        logits = create_method("cliper", tiny_clip).logits(x, text)
    p = F.interpolate(logits, size=(50, 70), mode="bilinear", align_corners=False)[0].softmax(0)
    want = torch.stack([p[0], torch.maximum(p[1], p[2]), p[3]])
    np.testing.assert_allclose(res.probs, want.numpy(), atol=1e-5)
    np.testing.assert_array_equal(res.labels, want.argmax(0).numpy())
    assert res.classes == ["red thing", "blue thing", "green thing"]

    with_background = seg.segment(rgb_image, "red thing, blue thing", background="sky")
    assert with_background.classes == ["red thing", "blue thing", "background"]
    assert with_background.probs.shape == (3, 50, 70)
    np.testing.assert_allclose(with_background.probs.sum(0), np.ones((50, 70)), atol=1e-4)
