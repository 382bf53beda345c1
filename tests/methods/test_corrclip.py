"""CorrCLIP (``corrclip``) against a literal re-computation of its equations, written the slow, obvious
way: the DINO block run by hand, DBSCAN by breadth-first search, the attention scope pair by pair, per-head
loops with a hand-written softmax, the region tokens run through each block with their allowed keys listed,
the windows cut with the official grid formula and the regions' modal names counted one by one."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ref_positional, softmax
from torch import nn

from vocabseg import Segmenter
from vocabseg.errors import MethodOptionError, VocabsegError
from vocabseg.masks import MaskGeneratorError
from vocabseg.methods import create_method, get_method_spec
from vocabseg.methods.corrclip import apply_map_correction, connected_components, label_map

TOL = dict(atol=1e-5, rtol=1e-5)
SIZES = [(64, 64), (48, 80), (96, 64)]  # native grid, wide, tall
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def region_masks(h: int, w: int) -> np.ndarray:
    """Four overlapping masks (a small one inside a large one, two side by side) and an uncovered strip."""
    m = np.zeros((4, h, w), dtype=bool)
    m[0, : h // 2, : w - 8] = True  # large, top
    m[1, h // 2 :, : w // 2] = True  # bottom left
    m[2, h // 2 :, w // 2 : w - 8] = True  # bottom right; the last 8 columns are in no mask
    m[3, 4 : h // 4, 4 : w // 3] = True  # small, inside mask 0: painted first, so mask 0 overwrites it
    return m


def region_generator(image: np.ndarray) -> np.ndarray:
    return region_masks(*image.shape[:2])


# ----------------------------------------------------------------------------------------------------------------
# reference implementation
# ----------------------------------------------------------------------------------------------------------------


def unit(a: torch.Tensor) -> torch.Tensor:
    return a / a.norm(dim=-1, keepdim=True)


def ref_label_map(masks: np.ndarray) -> torch.Tensor:
    """The official painting: masks sorted by area (ascending), painted in that order with ids 1, 2, ..."""
    order = sorted(range(len(masks)), key=lambda i: masks[i].sum())
    labels = torch.zeros(masks.shape[1:], dtype=torch.int64)
    for rank, i in enumerate(order):
        labels[torch.from_numpy(masks[i])] = rank + 1
    return labels


def ref_block_inputs(clip, image: torch.Tensor):
    """One image -> the input of every block [X_1, ..., X_L] (each (1+N, D)) and the grid."""
    v = clip.visual
    x = F.conv2d(image[None], v.conv1.weight, stride=v.conv1.stride)[0]
    d, gh, gw = x.shape
    x = torch.cat([v.class_embedding[None], x.reshape(d, gh * gw).T])
    x = v.ln_pre(x + ref_positional(v.positional_embedding, gh, gw))
    inputs = [x]
    for block in v.transformer.resblocks[:-1]:
        x = block(x[None])[0]
        inputs.append(x)
    return inputs, (gh, gw)


def ref_dino_query_key(vfm, image: torch.Tensor) -> torch.Tensor:
    """(C, h', w'): q + k of the VFM's last block, its blocks run one by one."""
    model = vfm.model
    x = model.norm_pre(model._pos_embed(model.patch_embed(image[None])))
    for block in model.blocks[:-1]:
        x = block(x)
    z = model.blocks[-1].norm1(x)[0]
    qkv = model.blocks[-1].attn.qkv
    c = z.shape[-1]
    q = z @ qkv.weight[:c].T + qkv.bias[:c]
    k = z @ qkv.weight[c : 2 * c].T + qkv.bias[c : 2 * c]
    h, w = image.shape[-2] // 8, image.shape[-1] // 8
    return (q + k)[model.num_prefix_tokens :].T.reshape(c, h, w)


def ref_nearest(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of a label map (integer ratios here): cell (i, j) reads (floor(i·H/h), floor(j·W/w))."""
    h, w = labels.shape
    out = torch.zeros(size, dtype=labels.dtype)
    for i in range(size[0]):
        for j in range(size[1]):
            out[i, j] = labels[i * h // size[0], j * w // size[1]]
    return out


def ref_dbscan(dist: torch.Tensor, eps: float) -> list[int]:
    """DBSCAN, min_samples 1, on a precomputed distance matrix: cluster numbers in order of discovery."""
    n = dist.shape[0]
    cluster = [-1] * n
    current = 0
    for start in range(n):
        if cluster[start] != -1:
            continue
        cluster[start] = current
        queue = [start]
        while queue:
            p = queue.pop()
            for q in range(n):
                if cluster[q] == -1 and dist[p, q] <= eps:
                    cluster[q] = current
                    queue.append(q)
        current += 1
    return cluster


def ref_merge(labels: list[int], e: torch.Tensor, eps: float) -> list[int]:
    ids = sorted(set(labels) - {0})
    if len(ids) < 2:
        return labels
    means = unit(torch.stack([e[[i for i, lab in enumerate(labels) if lab == r]].mean(0) for r in ids]))
    cos = means @ means.T
    cluster = ref_dbscan(cos.max() - cos, eps)
    new = {r: 1000 + c for r, c in zip(ids, cluster)}
    return [new.get(lab, 0) for lab in labels]


def ref_attention(sim: torch.Tensor, labels: list[int], tau: float) -> torch.Tensor:
    m = len(labels)
    mean = sim.mean()
    logits = torch.full((m, m), float("-inf"))
    for i in range(m):
        for j in range(m):
            same = labels[i] == labels[j] and labels[i] != 0
            unsegmented = labels[i] == 0 or labels[j] == 0
            if same or (unsegmented and sim[i, j] > mean):
                logits[i, j] = tau * sim[i, j]
    return softmax(logits)


def ref_heads(block, x_ln: torch.Tensor, part: int) -> list[torch.Tensor]:
    """Per-head projections of part 0 (q), 1 (k) or 2 (v) of a block's fused in-projection."""
    attn = block.attn
    d = x_ln.shape[-1]
    hd = d // attn.num_heads
    out = []
    for h in range(attn.num_heads):
        rows = slice(part * d + h * hd, part * d + (h + 1) * hd)
        out.append(x_ln @ attn.in_proj_weight[rows].T + attn.in_proj_bias[rows])
    return out


def ref_out_proj(block, heads: list[torch.Tensor]) -> torch.Tensor:
    o = block.attn.out_proj
    return torch.cat(heads, dim=-1) @ o.weight.T + o.bias


def ref_branch(clip, x: torch.Tensor, grid, attn: torch.Tensor, out_grid) -> torch.Tensor:
    """O(Attn · V(LN1_L(x))), per head, values resized bilinearly to the VFM grid: (M, D)."""
    last = clip.visual.transformer.resblocks[-1]
    heads = []
    for v in ref_heads(last, last.ln_1(x), 2):
        vg = F.interpolate(v[1:].T.reshape(1, -1, *grid), size=out_grid, mode="bilinear", align_corners=False)
        heads.append(attn @ vg[0].reshape(vg.shape[1], -1).T)
    return ref_out_proj(last, heads)


def ref_region_token(clip, inputs, region: torch.Tensor) -> torch.Tensor:
    """A region token through every block, attending to the CLS token and the patches of ``region`` (N,)."""
    keys = [0] + [1 + i for i in range(len(region)) if region[i]]
    token = inputs[0][:1]
    for block, context in zip(clip.visual.transformer.resblocks, inputs):
        qs = ref_heads(block, block.ln_1(token), 0)
        ks = ref_heads(block, block.ln_1(context), 1)
        vs = ref_heads(block, block.ln_1(context), 2)
        heads = []
        for q, k, v in zip(qs, ks, vs):
            a = softmax((q @ k[keys].T) / math.sqrt(q.shape[-1]))
            heads.append(a @ v[keys])
        y = token + ref_out_proj(block, heads)
        token = y + block.mlp(block.ln_2(y))
    return token[0]


def ref_features(clip, vfm, image, labels, *, alpha=1.0, beta=0.5, tau=4.0, eps=0.2, spatial=(0,)):
    """CorrCLIP's features (E, h', w') of one CLIP-normalised window (3, H, W) with its labels (H, W)."""
    v = clip.visual
    rgb = image * torch.tensor(v.image_std).view(3, 1, 1) + torch.tensor(v.image_mean).view(3, 1, 1)
    imnet = (rgb - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    e = ref_dino_query_key(vfm, imnet)
    out_grid = tuple(e.shape[-2:])
    e = unit(e.reshape(e.shape[0], -1).T)  # (M, C)
    on_vfm = ref_nearest(labels, out_grid).flatten().tolist()
    merged = ref_merge(on_vfm, e, eps)
    attn = ref_attention(e @ e.T, merged, tau)
    inputs, grid = ref_block_inputs(clip, image)
    main = v.ln_post(ref_branch(clip, inputs[-1], grid, attn, out_grid))
    mid = torch.stack([inputs[i + 1] for i in spatial]).mean(0)  # outputs of the spatial blocks
    spatial_out = v.ln_post(ref_branch(clip, mid, grid, attn, out_grid))
    on_clip = ref_nearest(torch.tensor(merged).reshape(out_grid), grid)
    tokens = {lab: ref_region_token(clip, inputs, on_clip.flatten() == lab) for lab in on_clip.unique().tolist()}
    back = ref_nearest(on_clip, out_grid).flatten().tolist()
    semantic = v.ln_post(torch.stack([tokens[lab] for lab in back]))
    f = (main + alpha * spatial_out + beta * semantic) @ v.proj
    return f.T.reshape(-1, *out_grid)


def ref_window_logits(clip, vfm, image, labels, text, pad: int, **kwargs) -> torch.Tensor:
    h, w = image.shape[-2:]
    ph, pw = -h % pad, -w % pad
    top, left = ph // 2, pw // 2
    padded = F.pad(image, (left, pw - left, top, ph - top))
    padded_labels = F.pad(labels, (left, pw - left, top, ph - top), value=99999)
    f = ref_features(clip, vfm, padded, padded_labels, **kwargs)
    cos = torch.einsum("chw,kc->khw", unit(f.permute(1, 2, 0)).permute(2, 0, 1), text)
    cos = F.interpolate(cos[None], size=padded.shape[-2:], mode="bilinear", align_corners=False)[0]
    return cos[:, top : top + h, left : left + w]


def ref_logits(clip, vfm, image, text, masks, *, crop, stride, pad, correct=True, **kwargs) -> torch.Tensor:
    labels = ref_label_map(masks)
    h, w = image.shape[-2:]
    total, count = torch.zeros(text.shape[0], h, w), torch.zeros(h, w)
    for r in range(max(h - crop + stride - 1, 0) // stride + 1):
        for c in range(max(w - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            crop_image, crop_labels = image[:, y1:y2, x1:x2], labels[y1:y2, x1:x2]
            total[:, y1:y2, x1:x2] += ref_window_logits(clip, vfm, crop_image, crop_labels, text, pad, **kwargs)
            count[y1:y2, x1:x2] += 1
    out = total / count
    return ref_map_correction(out, labels) if correct else out


def ref_map_correction(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each region: its most frequent argmax name (lowest on ties); every pixel gets the mean logits of the
    region's pixels predicting that name."""
    out = logits.clone()
    pred = logits.argmax(0)
    for lab in labels.unique().tolist():
        if lab == 0:
            continue
        pixels = [(i, j) for i, j in zip(*torch.nonzero(labels == lab, as_tuple=True))]
        votes = Counter(int(pred[i, j]) for i, j in pixels)
        best = max(votes.values())
        mode = min(n for n, c in votes.items() if c == best)
        voters = [logits[:, i, j] for i, j in pixels if pred[i, j] == mode]
        mean = torch.stack(voters).mean(0)
        for i, j in pixels:
            out[:, i, j] = mean
    return out


# ----------------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text() -> torch.Tensor:
    return F.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(3)), dim=-1)


def make(tiny_clip, tiny_vfm, **kwargs) -> nn.Module:
    return create_method("corrclip", tiny_clip, vfm=tiny_vfm, masks=region_generator, **kwargs).eval()


def test_label_map_paints_larger_masks_last():
    masks = region_masks(32, 48)
    got = label_map(masks)
    assert torch.equal(got, ref_label_map(masks))
    assert int(got[5, 5]) == 4 and int(got[-1, -1]) == 0  # the small mask is overwritten; the strip is in none
    assert torch.equal(label_map(np.zeros((0, 5, 6), dtype=bool)), torch.zeros(5, 6, dtype=torch.int64))


def test_connected_components_equal_dbscan_with_min_samples_one():
    g = torch.Generator().manual_seed(0)
    for n, eps in [(1, 0.2), (7, 0.05), (12, 0.3), (20, 0.6)]:
        feats = F.normalize(torch.randn(n, 3, generator=g), dim=1)
        cos = feats @ feats.T
        dist = cos.max() - cos
        got = connected_components(dist <= eps).tolist()
        assert got == ref_dbscan(dist, eps), (n, eps)
    chain = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert connected_components(chain).tolist() == [0, 0, 0, 1]  # 0 and 2 joined through 1


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("pad", [0, 56])
@pytest.mark.parametrize("eps", [0.2, 0.9])  # the official radius, and one that merges regions of random features
def test_dense_features_match_reference(size, pad, eps, tiny_clip, tiny_vfm):
    method = make(tiny_clip, tiny_vfm, merge_eps=eps)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    labels = label_map(region_masks(*size))
    h, w = size
    ph, pw = -h % pad if pad else 0, -w % pad if pad else 0
    border = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    padded, padded_labels = F.pad(images, border), F.pad(labels, border, value=99999)
    with torch.no_grad():
        got = method.features(padded, padded_labels.expand(2, -1, -1))
        for b in range(2):
            want = ref_features(tiny_clip, tiny_vfm, padded[b], padded_labels, eps=eps)
            torch.testing.assert_close(got[b], want, **TOL)


def test_merging_and_unsegmented_pixels_are_exercised(tiny_clip, tiny_vfm):
    """With eps 0.9 the parity test's regions do get merged, two of them only through a third (DBSCAN's
    chaining), and some pixels are in no mask: the parity test covers every rule of the scope."""
    from vocabseg.methods.corrclip import last_block_query_key, merge_regions

    image = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(1))
    e = F.normalize(last_block_query_key(tiny_vfm.model, image[None])[0].flatten(1).T, dim=1)
    labels = F.interpolate(label_map(region_masks(64, 64))[None, None].float(), size=(8, 8)).long().flatten()
    assert (labels == 0).any() and len(labels[labels > 0].unique()) == 3
    kept = merge_regions(labels, e, 0.2)  # random features: nothing within 0.2, the regions are renumbered 1..3
    assert torch.equal(kept, torch.unique(labels, return_inverse=True)[1])
    merged = merge_regions(labels, e, 0.9)
    assert torch.equal(merged, (labels > 0).long())  # one region; 0 stays 0
    means = F.normalize(torch.stack([e[labels == r].mean(0) for r in labels[labels > 0].unique()]), dim=1)
    cos = means @ means.T
    assert int(((cos.max() - cos) > 0.9).sum()) == 2  # a pair farther apart than eps, joined through the third


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_scores_match_reference(size, tiny_clip, tiny_vfm, text):
    method = make(tiny_clip, tiny_vfm, slide_crop=48, slide_stride=32)
    image = torch.randn(3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = method.logits(image[None], text, pad_multiple=56)[0]
        want = ref_logits(tiny_clip, tiny_vfm, image, text, region_masks(*size), crop=48, stride=32, pad=56)
    torch.testing.assert_close(got, want, **TOL)


def test_map_correction_gives_each_region_its_modal_name():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 12, 16, generator=g)
    labels = label_map(region_masks(12, 16))
    got = apply_map_correction(logits, labels)
    torch.testing.assert_close(got, ref_map_correction(logits, labels), **TOL)
    pred, before = got.argmax(0), logits.argmax(0)
    for lab in labels.unique().tolist():
        region = labels == lab
        if lab == 0:
            assert torch.equal(got[:, region], logits[:, region])  # pixels in no mask keep their logits
            continue
        counts = torch.bincount(before[region], minlength=5)
        assert (pred[region] == int(counts.argmax())).all()  # the official torch.mode of the region


def test_a_batch_equals_its_images_one_by_one(tiny_clip, tiny_vfm, text):
    method = make(tiny_clip, tiny_vfm, slide_crop=32, slide_stride=16)
    images = torch.randn(3, 3, 48, 80, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        together = method.logits(images, text, pad_multiple=56)
        alone = torch.cat([method.logits(images[i : i + 1], text, pad_multiple=56) for i in range(3)])
    torch.testing.assert_close(together, alone, **TOL)


@pytest.mark.parametrize(
    "option",
    [
        dict(alpha=0.0),
        dict(beta=0.0),
        dict(tau=1.0),
        dict(merge_eps=0.0),
        dict(map_correction=False),
        dict(slide_crop=0),
    ],
    ids=lambda o: next(iter(o)),
)
def test_options_change_the_output(option, tiny_clip, tiny_vfm, text):
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    base = dict(slide_crop=48, slide_stride=32)
    with torch.no_grad():
        default = make(tiny_clip, tiny_vfm, **base).logits(images, text, pad_multiple=56)
        changed = make(tiny_clip, tiny_vfm, **{**base, **option}).logits(images, text, pad_multiple=56)
    assert (default - changed).abs().max() > 1e-4, option
    if "map_correction" in option:
        ref = ref_map_correction(changed[0], label_map(region_masks(64, 96)))
        torch.testing.assert_close(default[0], ref, **TOL)


def test_spatial_blocks_follow_the_official_table(tiny_clip, tiny_vfm):
    method = make(tiny_clip, tiny_vfm)
    assert method.spatial_blocks == [0]  # 3 blocks: depth - 4 = -1 clamped to 1 block, the one before X_L's
    with pytest.raises(MethodOptionError, match=r"num_spatial must be an integer from 1 to 1 \(this CLIP has 3"):
        make(tiny_clip, tiny_vfm, num_spatial=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tau=0), "tau must be a number > 0"),
        (dict(alpha=-1), "alpha must be a number >= 0"),
        (dict(slide_crop=8), "slide_crop must be 0"),
        (dict(slide_stride=400), "slide_stride must be an integer from 1 to slide_crop"),
        (dict(masks=3), "masks must be a mask-generator name"),
        (dict(mask_options={"points_per_side": 4}), "mask_options apply to a named mask generator"),
    ],
)
def test_bad_options_are_refused(kwargs, message, tiny_clip, tiny_vfm):
    with pytest.raises(MethodOptionError, match=message):
        make(tiny_clip, tiny_vfm, **kwargs) if "masks" not in kwargs else create_method(
            "corrclip", tiny_clip, vfm=tiny_vfm, **kwargs
        )


def test_vfm_must_be_a_timm_vit(tiny_clip):
    conv = nn.Conv2d(3, 8, 8, stride=8)
    with pytest.raises(MethodOptionError, match=r"vfm must be a VFM name or a timm ViT .* got Conv2d"):
        create_method("corrclip", tiny_clip, vfm=conv, masks=region_generator)


def test_unknown_mask_generators_and_options_are_clear_errors(tiny_clip, tiny_vfm):
    with pytest.raises(VocabsegError, match=r"Unknown mask generator 'sam3'"):
        create_method("corrclip", tiny_clip, vfm=tiny_vfm, masks="sam3")
    with pytest.raises(VocabsegError, match=r"does not take dpi"):
        create_method("corrclip", tiny_clip, vfm=tiny_vfm, masks="sam2", mask_options={"dpi": 3})


def test_masks_of_the_wrong_size_are_refused_when_segmenting(tiny_clip, tiny_vfm, text):
    method = create_method("corrclip", tiny_clip, vfm=tiny_vfm, masks=lambda image: np.ones((1, 4, 4), bool))
    with pytest.raises(MaskGeneratorError, match=r"mask 0 has shape \(4, 4\) but the image is \(48, 80\)"):
        method.logits(torch.zeros(1, 3, 48, 80), text)


def test_surgery_is_refused(tiny_clip, tiny_vfm, text):
    with pytest.raises(MethodOptionError, match="corrclip does not take surgery=True"):
        make(tiny_clip, tiny_vfm).logits(torch.zeros(1, 3, 48, 80), text, surgery=True)


def test_registered_protocol():
    spec = get_method_spec("corrclip")
    assert (spec.defaults.crop, spec.defaults.pad_multiple, spec.defaults.logit_scale) == (0, 56, 40.0)
    assert spec.uses_vfm and spec.options["masks"] == "sam2" and spec.options["vfm"] == "dino_vitb8"
    assert spec.paper.settings["voc21"] == {"prob_threshold": 0.2}


def test_segmenter_end_to_end(tiny_clip, tiny_vfm, rgb_image):
    calls = []

    def generator(image):
        calls.append(image.shape)
        return region_masks(*image.shape[:2])

    seg = Segmenter(
        method="corrclip",
        model=tiny_clip,
        vfm=tiny_vfm,
        method_kwargs=dict(masks=generator, slide_crop=48, slide_stride=32),
        text_cache_dir=None,
        short_side=64,
    )
    res = seg.segment(rgb_image, "cat, dog, sofa")
    again = seg.segment(rgb_image, "cat, dog, sofa")
    assert res.labels.shape == rgb_image.shape[:2] and np.isfinite(res.probs).all()
    np.testing.assert_array_equal(res.labels, again.labels)
    assert calls == [(64, 90, 3)]  # the whole resized image, once: the second call is served by the cache
