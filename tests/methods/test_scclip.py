"""SC-CLIP's dense features vs. a literal re-computation of its equations, and its options.

The reference is written the slow, obvious way, one image at a time: LOF with per-token neighbour
lists and reachability distances, the 3×3 mean interpolation by looping over neighbours, hand-written
softmax, per-head attention. A 12-block tiny CLIP runs the official ViT-B/16 indices (pre-adjust 8,
post-adjust 3, fusion of 3..9); the 3-block test CLIP checks the clamping to shallow towers.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import ref_positional, softmax

from vocabseg import Segmenter
from vocabseg.errors import MethodOptionError
from vocabseg.eval.protocols import resolve_protocol
from vocabseg.methods import create_method
from vocabseg.methods.scclip import lof_outliers
from vocabseg.methods.self_calibration import mean_interpolation

TOL = dict(atol=1e-5, rtol=1e-5)
SIZES = [(64, 64), (48, 80), (96, 64)]  # native grid, wide, tall
DEFAULTS = dict(pre=8, post=3, multi=range(3, 10), res_cls=0.3, beta=0.4, k=30, contamination=0.05)


@pytest.fixture(scope="module")
def deep_clip() -> torch.nn.Module:
    """A random 12-block CLIP (ViT-B/16's depth at width 64), so the official indices apply unclamped."""
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.CLIP(
            embed_dim=32,
            vision_cfg={"image_size": 64, "layers": 12, "width": 64, "head_width": 32, "patch_size": 16},
            text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
            quick_gelu=True,
        )
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# reference implementation
# ----------------------------------------------------------------------------------------------------------------


def ref_block_outputs(clip, image: torch.Tensor):
    """One image -> the outputs (1+N, D) of blocks 1..L-1 and the grid."""
    v = clip.visual
    x = F.conv2d(image[None], v.conv1.weight, stride=v.conv1.stride)[0]
    d, gh, gw = x.shape
    x = torch.cat([v.class_embedding[None], x.reshape(d, gh * gw).T])
    x = v.ln_pre(x + ref_positional(v.positional_embedding, gh, gw))[None]
    outputs = []
    for block in v.transformer.resblocks[:-1]:
        x = block(x)
        outputs.append(x[0])
    return outputs, (gh, gw)


def ref_lof(tokens: torch.Tensor, k: int, contamination: float) -> list[int]:
    """Flagged token indices: LOF with reach(i, j) = max(d(i, j), k-dist(i)) on squared L2 distances,
    above the (1 - contamination) quantile by more than a relative 1e-5 (closer counts as a tie)."""
    n = tokens.shape[0]
    k = min(k, n - 1)
    dist = [((tokens - tokens[i]) ** 2).sum(-1).tolist() for i in range(n)]  # dist[i][j] = ‖t_i − t_j‖²
    neighbours = [sorted((j for j in range(n) if j != i), key=lambda j: dist[i][j])[:k] for i in range(n)]
    k_dist = [dist[i][neighbours[i][-1]] for i in range(n)]
    lrd = [k / (sum(max(dist[i][j], k_dist[i]) for j in neighbours[i]) / k) for i in range(n)]
    lof = [sum(lrd[j] / lrd[i] for j in neighbours[i]) / k for i in range(n)]
    ranked = sorted(lof)
    pos = (1 - contamination) * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    threshold = ranked[lo] + (pos - lo) * (ranked[hi] - ranked[lo])
    return [i for i in range(n) if lof[i] > threshold * (1 + 1e-5)]


def ref_mean_interpolation(tokens: torch.Tensor, grid, flagged: list[int]) -> torch.Tensor:
    h, w = grid
    out = tokens.clone()
    for i in flagged:
        r, c = divmod(i, w)
        around = [
            (r + dr) * w + (c + dc)
            for dr in (-1, 0, 1)
            for dc in (-1, 0, 1)
            if (dr, dc) != (0, 0) and 0 <= r + dr < h and 0 <= c + dc < w and (r + dr) * w + (c + dc) not in flagged
        ]
        if around:
            out[i] = torch.stack([tokens[j] for j in around]).mean(0)
    return out


def ref_cosine(tokens: torch.Tensor) -> torch.Tensor:
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    return unit @ unit.T


def ref_adjust(sim: torch.Tensor, beta: float, tokens: torch.Tensor) -> torch.Tensor:
    w = torch.where(sim < beta, torch.zeros_like(sim), sim)
    return (w / (w.sum(-1, keepdim=True) + 1e-6)) @ tokens


def ref_last_block(clip, tokens: torch.Tensor, sim: torch.Tensor, res_cls: float) -> torch.Tensor:
    """½[softmax(3(S − mean S)) masked below 0 + softmax(s·KKᵀ)] per head over patch tokens, O(·V) + res·CLS."""
    block = clip.visual.transformer.resblocks[-1]
    patches = block.ln_1(tokens[1:])
    d = patches.shape[-1]
    qkv = patches @ block.attn.in_proj_weight.T + block.attn.in_proj_bias
    k_all, v_all = qkv[:, d : 2 * d], qkv[:, 2 * d :]
    heads = block.attn.num_heads
    hd = d // heads
    a = 3.0 * (sim - sim.mean())
    a = torch.where(a < 0, torch.full_like(a, float("-inf")), a)
    sim_attn = softmax(a)
    outs = []
    for h in range(heads):
        k, v = k_all[:, h * hd : (h + 1) * hd], v_all[:, h * hd : (h + 1) * hd]
        attn = 0.5 * (sim_attn + softmax(hd**-0.5 * k @ k.T))
        outs.append(attn @ v)
    o = block.attn.out_proj
    return torch.cat(outs, dim=-1) @ o.weight.T + o.bias + res_cls * tokens[0]


def ref_scclip(clip, image: torch.Tensor, pre, post, multi, res_cls, beta, k, contamination):
    feats, grid = ref_block_outputs(clip, image)
    x = feats[-1]
    flagged = ref_lof(x[1:], k, contamination)
    patches = ref_mean_interpolation(x[1:], grid, flagged)
    sim = ref_cosine(ref_mean_interpolation(feats[pre][1:], grid, flagged))
    post_sim = ref_cosine(feats[post][1:])
    patches = ref_adjust(sim, beta, patches)
    y = ref_adjust(post_sim, beta, ref_last_block(clip, torch.cat([x[:1], patches]), sim, res_cls))
    fused = sum(feats[i] for i in multi)
    y = y + ref_adjust(post_sim, beta, ref_last_block(clip, fused, sim, res_cls))
    f = clip.visual.ln_post(y) @ clip.visual.proj
    return f.T.reshape(-1, *grid), flagged


# ----------------------------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES + [(256, 256), (160, 256)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dense_features_match_reference_at_vit_b_depth(size, deep_clip):
    """12 blocks: the official indices. The two large sizes (256 and 160 tokens) run LOF with k = 30;
    on the small grids k = N-1 (at 64x64, two mutually farthest tokens tie for the top LOF: no flag)."""
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    method = create_method("scclip", clip=deep_clip).eval()
    with torch.no_grad():
        got = method(images)
        for b in range(2):
            want, flagged = ref_scclip(deep_clip, images[b], **DEFAULTS)
            if size[0] * size[1] >= 160 * 256:
                assert flagged  # the anomaly-token path is exercised
            assert got[b].shape == want.shape
            torch.testing.assert_close(got[b], want, **TOL)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_shallow_tower_clamps_the_indices(size, tiny_clip):
    """3 blocks: every index falls to block 2 (the last intermediate); the fusion is that block alone.
    k = 4 so that the small grids flag tokens."""
    method = create_method("scclip", clip=tiny_clip, lof_neighbors=4).eval()
    assert (method.pre_adjust_idx, method.post_adjust_idx) == (1, 1)
    assert (method.multi_start_idx, method.multi_end_idx) == (1, 2)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = method(images)
        for b in range(2):
            want, flagged = ref_scclip(tiny_clip, images[b], **{**DEFAULTS, "pre": 1, "post": 1, "multi": [1], "k": 4})
            assert flagged
            torch.testing.assert_close(got[b], want, **TOL)


def test_batched_equals_one_by_one(deep_clip):
    """LOF, the similarity mean and the quantile are per image: a batch mixes nothing across images."""
    images = torch.randn(3, 3, 96, 128, generator=torch.Generator().manual_seed(4))
    images[1] *= 3.0  # a very different neighbour in the batch
    method = create_method("scclip", clip=deep_clip).eval()
    with torch.no_grad():
        together = method(images)
        for b in range(3):
            torch.testing.assert_close(together[b : b + 1], method(images[b : b + 1]), **TOL)


def test_global_embedding_is_clips(deep_clip):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))  # encode_image: native size
    with torch.no_grad():
        _, pooled = create_method("scclip", clip=deep_clip)(images, return_global=True)
        torch.testing.assert_close(pooled, deep_clip.encode_image(images), **TOL)


# ----------------------------------------------------------------------------------------------------------------
# the two building blocks on hand-made inputs
# ----------------------------------------------------------------------------------------------------------------
def test_lof_flags_the_isolated_token():
    """A 6×6 lattice of points plus one far away: only that one is flagged at 1/37 contamination."""
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    points = torch.cat([torch.stack([ys.flatten(), xs.flatten()], 1), torch.tensor([[20.0, 20.0]])])
    points = points[torch.randperm(37, generator=torch.Generator().manual_seed(0))]
    far = int((points == 20).all(1).nonzero())
    flagged = lof_outliers(points[None], n_neighbors=5, contamination=0.05)
    assert flagged[0].nonzero().flatten().tolist() == [far]
    assert not lof_outliers(points[None], n_neighbors=5, contamination=0.0).any()


def test_mean_interpolation_averages_unflagged_in_bounds_neighbours():
    # 3×4 grid, token values = their index; flag (0, 0), (0, 1) and (1, 1)
    tokens = torch.arange(12.0).view(1, 12, 1)
    flagged = torch.zeros(1, 12, dtype=torch.bool)
    flagged[0, [0, 1, 5]] = True
    out = mean_interpolation(tokens, (3, 4), flagged, isolated="keep")[0, :, 0]
    assert out[0] == 4.0  # neighbours 1, 4, 5 of which only 4 is unflagged
    assert out[1] == pytest.approx((2 + 4 + 6) / 3)  # 0, 5 flagged; 2, 4, 6 remain
    assert out[5] == pytest.approx((2 + 4 + 6 + 8 + 9 + 10) / 6)  # 0, 1 flagged
    unflagged = [i for i in range(12) if i not in (0, 1, 5)]
    assert out[unflagged].tolist() == [float(i) for i in unflagged]
    # a flagged token whose every neighbour is flagged keeps its value
    everything = torch.ones(1, 12, dtype=torch.bool)
    assert torch.equal(mean_interpolation(tokens, (3, 4), everything, isolated="keep"), tokens)


# ----------------------------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------------------------
CHANGES = [
    ("res_cls", 0.0, "res_cls"),
    ("beta", 0.1, "beta"),
    ("pre_adjust_idx", 5, "pre"),
    ("post_adjust_idx", 6, "post"),
    ("multi_start_idx", 7, None),
    ("multi_end_idx", 5, None),
    ("lof_neighbors", 10, "k"),
    ("lof_contamination", 0.2, "contamination"),
]


@pytest.mark.parametrize("option, value, ref_name", CHANGES, ids=[c[0] for c in CHANGES])
def test_options_change_the_output_as_the_equations_say(option, value, ref_name, deep_clip):
    images = torch.randn(1, 3, 160, 256, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        default = create_method("scclip", clip=deep_clip)(images)
        changed = create_method("scclip", clip=deep_clip, **{option: value})(images)
        settings = dict(DEFAULTS)
        if ref_name is not None:
            settings[ref_name] = value
        elif option == "multi_start_idx":
            settings["multi"] = range(7, 10)
        else:
            settings["multi"] = range(3, 5)
        want, _ = ref_scclip(deep_clip, images[0], **settings)
    assert (changed - default).abs().max() > 1e-4
    torch.testing.assert_close(changed[0], want, **TOL)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"pre_adjust_idx": -1}, "pre_adjust_idx must be an integer >= 0, got -1"),
        ({"post_adjust_idx": 2.5}, "post_adjust_idx must be an integer >= 0, got 2.5"),
        ({"multi_start_idx": 10}, r"multi_start_idx \(10\) must be below multi_end_idx \(10\)"),
        ({"lof_neighbors": 0}, "lof_neighbors must be an integer >= 1, got 0"),
        ({"lof_contamination": 1.0}, r"lof_contamination must be a number in \[0, 1\) \(0: off\), got 1.0"),
        ({"beta": 1.5}, r"beta must be a number in \[-1, 1\] \(a cosine\), got 1.5"),
        ({"res_cls": float("nan")}, "res_cls must be a finite number, got nan"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options, message, tiny_clip):
    with pytest.raises(MethodOptionError, match=f"^scclip: {message}"):
        create_method("scclip", clip=tiny_clip, **options)


def test_paper_protocol():
    voc = resolve_protocol("paper", "scclip", "voc21", True).config
    assert (voc.logit_scale, voc.prob_threshold, voc.area_threshold) == (50.0, 0.15, 0.1)
    assert (voc.short_side, voc.crop, voc.stride) == (336, 224, 112)
    obj = resolve_protocol("paper", "scclip", "coco_object", True).config
    assert (obj.logit_scale, obj.prob_threshold) == (55.0, 0.35)
    assert resolve_protocol("paper", "scclip", "context60", True).config.prob_threshold == 0.15
    city = resolve_protocol("paper", "scclip", "cityscapes", False).config
    assert (city.short_side, city.logit_scale, city.prob_threshold) == (560, 40.0, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------------------------
def test_segmenter_end_to_end(tiny_clip, rgb_image):
    """Sliding 32-px windows (2×2 tokens, so LOF runs with k = 3) through the whole pipeline."""
    small = dict(text_cache_dir=None, short_side=64, crop=32, stride=16)
    seg = Segmenter(method="scclip", model=tiny_clip, **small)
    res = seg.segment(rgb_image, "red thing, blue thing, green thing")
    assert res.labels.shape == (50, 70) and res.probs.shape == (3, 50, 70)
    np.testing.assert_allclose(res.probs.sum(0), 1.0, atol=1e-5)
    assert np.isfinite(res.probs).all()
    other = Segmenter(method="scclip", model=tiny_clip, method_kwargs={"res_cls": 1.0}, **small)
    assert np.abs(other.segment(rgb_image, "red thing, blue thing, green thing").probs - res.probs).max() > 1e-4
    sclip = Segmenter(method="sclip", model=tiny_clip, **small)
    assert np.abs(sclip.segment(rgb_image, "red thing, blue thing, green thing").probs - res.probs).max() > 1e-4
