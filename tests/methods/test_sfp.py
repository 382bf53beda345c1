"""SFP: dense features vs. a literal re-computation of its steps, batching, options, end to end.

The reference runs one image at a time with explicit per-head loops, a hand-written softmax, Python
lists for the outlier selection and explicit 3×3 neighbour loops, on the tiny 3-block CLIP: block 1's
output is the last block's input, and SOM reads block 1's attention, whose input is block 0's output.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_CLIP, softmax

from vocabseg import Segmenter
from vocabseg.errors import MethodOptionError
from vocabseg.methods import create_method, get_method_spec
from vocabseg.methods.self_calibration import mean_interpolation, similarity_attention
from vocabseg.methods.sfp import _som_outliers

TOL = dict(atol=1e-5, rtol=1e-5)
SIZES = [(64, 64), (48, 80), (96, 64)]  # native grid, wide, tall
LAYERS = dict(pre_layer=1, post_layer=0, fuse_layers=(0, 1))  # distinct blocks on the 3-block tower


# ----------------------------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------------------------


def ref_hidden(clip, image: torch.Tensor):
    """Block inputs and outputs (each (1+N, D)) of every block but the last, and the grid."""
    v = clip.visual
    x = F.conv2d(image[None], v.conv1.weight, stride=v.conv1.stride)[0]
    d, gh, gw = x.shape
    pos = v.positional_embedding
    n = int(math.sqrt(pos.shape[0] - 1))
    if (gh, gw) != (n, n):
        g = F.interpolate(
            pos[1:].reshape(1, n, n, d).permute(0, 3, 1, 2),
            scale_factor=((gh + 0.1) / n, (gw + 0.1) / n),
            mode="bicubic",
        )
        pos = torch.cat([pos[:1], g.permute(0, 2, 3, 1).reshape(gh * gw, d)])
    x = v.ln_pre(torch.cat([v.class_embedding[None], x.reshape(d, gh * gw).T]) + pos)
    inputs, outputs = [], []
    for block in v.transformer.resblocks[:-1]:
        inputs.append(x)
        x = block(x[None])[0]
        outputs.append(x)
    return inputs, outputs, (gh, gw)


def ref_heads(block, tokens: torch.Tensor):
    """Per-head q, k, v lists of ``block`` on ``tokens`` (T, D) and the scale."""
    h = block.attn.num_heads
    d = tokens.shape[-1]
    qkv = block.ln_1(tokens) @ block.attn.in_proj_weight.T + block.attn.in_proj_bias
    hd = d // h
    split = lambda t: [t[:, i * hd : (i + 1) * hd] for i in range(h)]  # noqa: E731
    return split(qkv[:, :d]), split(qkv[:, d : 2 * d]), split(qkv[:, 2 * d :]), hd**-0.5


def ref_out(block, heads):
    o = block.attn.out_proj
    return torch.cat(heads, dim=-1) @ o.weight.T + o.bias


def ref_outliers(clip, block_input, x, outlier, k):
    n = x.shape[0] - 1
    if outlier == "none":
        return []
    if outlier == "l2norm":
        norms = [(float(x[1 + p].norm()), p) for p in range(n)]
        return [p for _, p in sorted(norms, reverse=True)[:k]]
    qs, ks, _, s = ref_heads(clip.visual.transformer.resblocks[-2], block_input)
    attn = sum(softmax(s * q @ kk.T) for q, kk in zip(qs, ks)) / len(qs)
    candidates = [(1.5 * float(attn[0, 1 + p]), p) for p in range(n) if 1.5 * attn[0, 1 + p] > attn[1 + p, 1 + p]]
    return [p for _, p in sorted(candidates, reverse=True)[:k]]


def ref_purify(tokens, outliers, grid):
    gh, gw = grid
    out = tokens.clone()
    for p in outliers:
        r, c = p // gw, p % gw
        total, count = torch.zeros(tokens.shape[1]), 0
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                if (dr, dc) != (0, 0) and 0 <= rr < gh and 0 <= cc < gw and rr * gw + cc not in outliers:
                    total, count = total + tokens[rr * gw + cc], count + 1
        out[p] = total / max(count, 1)
    return out


def ref_similarity(tokens):
    n = tokens.shape[0]
    unit = [t / max(float(t.norm()), 1e-12) for t in tokens]
    sim = torch.zeros(n, n)
    for i in range(n):
        for j in range(n):
            c = float(unit[i] @ unit[j])
            sim[i, j] = c if c >= 0.4 else 0.0
    return sim


def ref_aggregate(tokens, sim):
    return torch.stack(
        [sum(sim[i, j] * tokens[j] for j in range(len(tokens))) / (sim[i].sum() + 1e-6) for i in range(len(tokens))]
    )


def ref_semantic(sim):
    m = 3.0 * (sim - sim.mean())
    for i in range(len(m)):
        row_empty = bool((m[i] < 0).all())
        for j in range(len(m)):
            if m[i, j] < 0 and not (row_empty and i == j):
                m[i, j] = float("-inf")
    return softmax(m)


def ref_sfp(clip, image, outlier="som", num_outliers=10, res_cls=0.3, pre_layer=1, post_layer=0, fuse_layers=(0, 1)):
    inputs, outputs, grid = ref_hidden(clip, image)
    x = outputs[-1]
    outliers = ref_outliers(clip, inputs[-1], x, outlier, num_outliers)
    patches = ref_purify(x[1:], outliers, grid)
    s_pre = ref_similarity(ref_purify(outputs[pre_layer][1:], outliers, grid))
    s_post = ref_similarity(outputs[post_layer][1:])
    semantic = ref_semantic(s_pre)
    last = clip.visual.transformer.resblocks[-1]
    qs, ks, vs, s = ref_heads(last, ref_aggregate(patches, s_pre))
    heads = [(softmax(s * q @ q.T) + softmax(s * k @ k.T) + semantic) / 3 @ v for q, k, v in zip(qs, ks, vs)]
    t1 = ref_out(last, heads) + res_cls * x[0]
    fused = sum(outputs[i] for i in fuse_layers)
    _, _, vs2, _ = ref_heads(last, fused[1:])
    t2 = ref_out(last, [semantic @ v for v in vs2]) + res_cls * fused[0]
    tokens = ref_aggregate(t1, s_post) + ref_aggregate(t2, s_post)
    feats = clip.visual.ln_post(tokens) @ clip.visual.proj
    return feats.T.reshape(-1, *grid), outliers


# ----------------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------------
CASES = [("som", 10), ("som", 3), ("som", 20), ("l2norm", 3), ("none", 10)]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("outlier,num_outliers", CASES, ids=lambda c: str(c))
def test_dense_features_match_reference(tiny_clip, size, outlier, num_outliers):
    torch.manual_seed(1)
    images = torch.randn(2, 3, *size)
    method = create_method("sfp", tiny_clip, outlier=outlier, num_outliers=num_outliers, **LAYERS).eval()
    with torch.no_grad():
        got = method(images)
        for b in range(2):
            want, outliers = ref_sfp(tiny_clip, images[b], outlier, num_outliers, **LAYERS)
            assert got[b].shape == want.shape
            torch.testing.assert_close(got[b], want, **TOL)
            n = want.shape[1] * want.shape[2]
            if outlier == "som" and num_outliers == 20:  # more asked than there are candidates: the rule bites
                assert 0 < len(outliers) < n
            elif outlier != "none":
                assert len(outliers) == num_outliers


def test_default_layers_on_a_shallow_tower_and_global_embedding(tiny_clip):
    """Blocks 8, 3 and 3..9 clamp to block 1 (the last block's input) on a 3-block tower."""
    method = create_method("sfp", tiny_clip).eval()
    assert (method.pre_layer, method.post_layer, method.fuse_layers) == (1, 1, (1,))
    images = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense = method(images)
        want, _ = ref_sfp(tiny_clip, images[1], pre_layer=1, post_layer=1, fuse_layers=(1,))
        torch.testing.assert_close(dense[1], want, **TOL)
        native = images[..., :64, :64]  # encode_image takes the native size only
        torch.testing.assert_close(method(native, return_global=True)[1], tiny_clip.encode_image(native), **TOL)


def test_batched_equals_one_by_one(tiny_clip):
    """Outliers, similarity means and thresholds are per image: batching mixes nothing."""
    method = create_method("sfp", tiny_clip, **LAYERS).eval()
    images = torch.randn(4, 3, 48, 80, generator=torch.Generator().manual_seed(4))
    images[2] *= 5  # images that differ in scale, so a batch-wide mean would show
    with torch.no_grad():
        batched = method(images)
        alone = torch.cat([method(images[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, alone, **TOL)


@pytest.mark.parametrize(
    "option",
    [
        {"outlier": "l2norm"},
        {"outlier": "none"},
        {"num_outliers": 2},
        {"res_cls": 0.0},
        {"pre_layer": 0},
        {"post_layer": 1},
        {"fuse_layers": (1,)},
    ],
    ids=lambda o: next(iter(o)) + "=" + str(next(iter(o.values()))),
)
def test_options_change_the_output(tiny_clip, option):
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = create_method("sfp", tiny_clip, **LAYERS)(images)
        changed = create_method("sfp", tiny_clip, **{**LAYERS, **option})(images)
    assert (base - changed).abs().max() > 1e-4


@pytest.mark.parametrize(
    "option,message",
    [
        ({"outlier": "lof"}, "outlier='lof' must be one of som, l2norm, none"),
        ({"num_outliers": -1}, "num_outliers=-1 must be an integer >= 0"),
        (
            {"pre_layer": 8},
            "pre_layer names block 8, which this tower does not return: it has 3 blocks, so blocks 0..1",
        ),
        ({"post_layer": -1}, "post_layer names block -1"),
        ({"fuse_layers": (0, 2)}, "fuse_layers names block 2"),
        ({"fuse_layers": ()}, "fuse_layers=() must be a non-empty sequence"),
    ],
)
def test_bad_options_are_refused_naming_them(tiny_clip, option, message):
    with pytest.raises(MethodOptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        create_method("sfp", tiny_clip, **option)


def test_som_needs_three_blocks():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no pretrained weights
        two_blocks = open_clip.create_model(SMALL_CLIP, pretrained=None).eval()
    with pytest.raises(MethodOptionError, match=r"outlier='som' .* needs 3 or more blocks \(it has 2\)"):
        create_method("sfp", two_blocks)
    method = create_method("sfp", two_blocks, outlier="l2norm")
    assert (method.pre_layer, method.post_layer, method.fuse_layers) == (0, 0, (0,))
    with torch.no_grad():
        assert torch.isfinite(method(torch.randn(1, 3, 48, 64))).all()


def test_som_keeps_only_patches_the_cls_token_attends_to_more_than_themselves():
    attn = torch.zeros(1, 5, 5)
    attn[0, 0, 1:] = torch.tensor([0.10, 0.30, 0.20, 0.05])  # CLS -> patches (weighted by 1.5)
    attn[0, 1:, 1:] = torch.diag(torch.tensor([0.20, 0.50, 0.20, 0.01]))  # patches -> themselves
    # 1.5 * [0.10, 0.30, 0.20, 0.05] = [0.15, 0.45, 0.30, 0.075] > [0.20, 0.50, 0.20, 0.01] at patches 2 and 3
    assert _som_outliers(attn, 10).tolist() == [[False, False, True, True]]
    assert _som_outliers(attn, 1).tolist() == [[False, False, True, False]]  # the largest first


def test_mean_interpolation_uses_valid_neighbours_only():
    tokens = torch.arange(9, dtype=torch.float32).view(1, 9, 1)  # 3x3 grid, values 0..8
    outliers = torch.zeros(1, 9, dtype=torch.bool)
    outliers[0, [0, 1]] = True
    out = mean_interpolation(tokens, (3, 3), outliers, isolated="zero")[0, :, 0]
    assert out[0] == pytest.approx((3 + 4) / 2)  # corner: neighbours 1 (an outlier), 3, 4
    assert out[1] == pytest.approx((2 + 3 + 4 + 5) / 4)  # neighbours 0 (outlier), 2, 3, 4, 5
    assert out[2:].tolist() == list(range(2, 9))
    lonely = torch.ones(1, 4, dtype=torch.bool)  # every neighbour an outlier: zero (the released code: NaN later)
    assert mean_interpolation(torch.ones(1, 4, 2), (2, 2), lonely, isolated="zero").abs().sum() == 0


def test_semantic_attention_masks_below_the_mean_and_keeps_empty_rows_finite():
    sim = torch.tensor([[[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]]])  # mean 1/3; last row all below
    attn = similarity_attention(sim, keep_diagonal="empty_rows")[0]
    m = 3 * (1.0 - 1 / 3), 3 * (0.5 - 1 / 3)
    first = torch.tensor([math.exp(m[0]), math.exp(m[1]), 0.0])
    torch.testing.assert_close(attn[0], first / first.sum())
    torch.testing.assert_close(attn[2], torch.tensor([0.0, 0.0, 1.0]))  # the diagonal, not NaN


def test_spec():
    spec = get_method_spec("sfp")
    assert dict(spec.options) == {
        "outlier": "som",
        "num_outliers": 10,
        "res_cls": 0.3,
        "pre_layer": None,
        "post_layer": None,
        "fuse_layers": None,
    }
    assert spec.paper.settings["voc21"] == {"logit_scale": 50.0, "prob_threshold": 0.15, "area_threshold": 0.1}
    assert spec.paper.settings["coco_object"] == {"logit_scale": 55.0, "prob_threshold": 0.35}
    assert (spec.defaults.short_side, spec.defaults.crop, spec.defaults.stride, spec.defaults.logit_scale) == (
        336,
        224,
        112,
        40.0,
    )


def test_segmenter_end_to_end(tiny_clip, rgb_image):
    settings = dict(short_side=64, crop=32, stride=16, text_cache_dir=None)
    seg = Segmenter(method="sfp", model=tiny_clip, method_kwargs=LAYERS, **settings)
    res = seg.segment(rgb_image, "red thing, blue thing, green thing")
    assert res.labels.shape == (50, 70) and res.probs.shape == (3, 50, 70)
    assert np.isfinite(res.probs).all()
    np.testing.assert_allclose(res.probs.sum(0), 1.0, atol=1e-5)
    assert res.info["method"] == "sfp"
    other = Segmenter(method="sfp", model=tiny_clip, method_kwargs={**LAYERS, "outlier": "none"}, **settings)
    assert not np.allclose(res.probs, other.segment(rgb_image, "red thing, blue thing, green thing").probs)
