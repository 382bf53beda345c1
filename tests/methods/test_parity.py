"""Each method's dense features vs. an independent, literal re-computation from its equations.

The reference below is written the slow, obvious way (explicit per-head loops, hand-written
softmax, explicit Gaussian loops, one image at a time), using the same weights, and must agree with
the library to 1e-5. Inputs include non-square images, so height/width mix-ups cannot hide.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ref_positional, softmax

from vocabseg.methods import create_method, list_methods

TOL = dict(atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# reference implementation
# ----------------------------------------------------------------------------------------------------------------


def ref_block_input(clip, image: torch.Tensor):
    """One image (3, H, W) -> last block input (1+N, D), grid."""
    v = clip.visual
    x = F.conv2d(image[None], v.conv1.weight, stride=v.conv1.stride)[0]  # (D, gh, gw)
    d, gh, gw = x.shape
    x = torch.cat([v.class_embedding[None], x.reshape(d, gh * gw).T])
    x = v.ln_pre(x + ref_positional(v.positional_embedding, gh, gw))[None]
    for block in v.transformer.resblocks[:-1]:
        x = block(x)
    return x[0], (gh, gw)


def ref_heads(clip, x: torch.Tensor):
    """Per-head q, k, v lists from the last block's fused projection."""
    block = clip.visual.transformer.resblocks[-1]
    h = block.attn.num_heads
    qkv = block.ln_1(x) @ block.attn.in_proj_weight.T + block.attn.in_proj_bias
    d = x.shape[-1]
    q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
    hd = d // h
    split = lambda t: [t[:, i * hd : (i + 1) * hd] for i in range(h)]  # noqa: E731
    return split(q), split(k), split(v), hd**-0.5


def ref_out(clip, per_head_outputs):
    o = clip.visual.transformer.resblocks[-1].attn.out_proj
    return torch.cat(per_head_outputs, dim=-1) @ o.weight.T + o.bias


def ref_ffn(clip, y):
    block = clip.visual.transformer.resblocks[-1]
    return y + block.mlp(block.ln_2(y))


def ref_head(clip, tokens, grid):
    f = clip.visual.ln_post(tokens) @ clip.visual.proj
    return f.T.reshape(-1, *grid)


def ref_dense(method: str, clip, image: torch.Tensor, vfm=None, gamma=3.0, beta=1.2, std=5.0):
    x, grid = ref_block_input(clip, image)
    qs, ks, vs, s = ref_heads(clip, x)
    if method == "clip":
        y = ref_ffn(clip, x + ref_out(clip, [softmax(s * q @ k.T) @ v for q, k, v in zip(qs, ks, vs)]))
        return ref_head(clip, y[1:], grid)
    if method == "maskclip":
        y = ref_ffn(clip, x + ref_out(clip, vs))
        return ref_head(clip, y[1:], grid)
    if method == "sclip":
        heads = [(softmax(s * q @ q.T) + softmax(s * k @ k.T)) @ v for q, k, v in zip(qs, ks, vs)]
        y = ref_ffn(clip, x + ref_out(clip, heads))
        return ref_head(clip, y[1:], grid)
    if method == "clearclip":
        return ref_head(clip, ref_out(clip, [softmax(s * q @ q.T) @ v for q, v in zip(qs, vs)])[1:], grid)
    if method == "naclip":
        n = grid[0] * grid[1]
        omega = torch.zeros(n + 1, n + 1)
        for i in range(n):
            for j in range(n):
                dy, dx = i // grid[1] - j // grid[1], i % grid[1] - j % grid[1]
                omega[i + 1, j + 1] = math.exp(-(dy * dy + dx * dx) / (2 * std * std))
        return ref_head(clip, ref_out(clip, [softmax(s * k @ k.T + omega) @ v for k, v in zip(ks, vs)])[1:], grid)
    if method == "proxyclip":
        mean = torch.tensor(clip.visual.image_mean).view(3, 1, 1)
        sd = torch.tensor(clip.visual.image_std).view(3, 1, 1)
        imnet = (image * sd + mean - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]
        ).view(3, 1, 1)
        e = vfm(imnet[None])[0]  # (C, h', w')
        out_grid = tuple(e.shape[-2:])
        e = F.normalize(e.reshape(e.shape[0], -1), dim=0)
        a = gamma * (e.T @ e - beta * (e.T @ e).mean())
        a[a < 0] = float("-inf")
        attn = softmax(a)
        heads = []
        for v in vs:
            vg = v[1:].T.reshape(1, -1, *grid)
            vg = F.interpolate(vg, size=out_grid, mode="bilinear", align_corners=False)
            heads.append(attn @ vg[0].reshape(vg.shape[1], -1).T)
        return ref_head(clip, ref_out(clip, heads), out_grid)
    raise AssertionError(method)


# ----------------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------------
SIZES = [(64, 64), (48, 80), (96, 64)]  # native grid, wide, tall


def make_method(name, tiny_clip, tiny_vfm):
    kwargs = {"vfm": tiny_vfm} if name == "proxyclip" else {}
    return create_method(name, clip=tiny_clip, **kwargs).eval()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", ["clip", "maskclip", "sclip", "clearclip", "naclip", "proxyclip"])
def test_dense_features_match_reference(name, size, tiny_clip, tiny_vfm):
    torch.manual_seed(1)
    images = torch.randn(2, 3, *size)
    method = make_method(name, tiny_clip, tiny_vfm)
    with torch.no_grad():
        got = method(images)
        for b in range(2):  # batched output == per-image reference (ProxyCLIP's mean is per image)
            want = ref_dense(name, tiny_clip, images[b], vfm=tiny_vfm)
            assert got[b].shape == want.shape
            torch.testing.assert_close(got[b], want, **TOL)


#: methods whose equations are re-computed in their own test file (tests/methods/test_<name>.py)
OWN_REFERENCE = {"scclip", "sfp", "cliper", "corrclip", "trident"}


def test_every_registered_method_has_a_reference():
    here = {"clip", "maskclip", "sclip", "clearclip", "naclip", "proxyclip"}
    assert set(list_methods(trainable=False)) == here | OWN_REFERENCE
    tests = Path(__file__).parent
    markers = ("match_reference", "match_reference_at_vit_b_depth", "match_the_literal_recomputation")
    for name in OWN_REFERENCE:
        text = (tests / f"test_{name}.py").read_text()
        assert any(f"{m}(" in text for m in markers), f"test_{name}.py has no re-computation test"


def test_methods_really_differ(tiny_clip, tiny_vfm):
    """Guard against a reference that is accidentally the same for all methods."""
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = {n: make_method(n, tiny_clip, tiny_vfm)(images) for n in ["clip", "maskclip", "sclip", "clearclip"]}
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)


def test_clip_global_embedding_equals_encode_image(tiny_clip, tiny_vfm):
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():  # (corrclip and trident need masks / SAM: their own test files check this)
        for name in sorted(set(list_methods(trainable=False)) - {"corrclip", "trident"}):
            _, pooled = make_method(name, tiny_clip, tiny_vfm)(images, return_global=True)
            torch.testing.assert_close(pooled, tiny_clip.encode_image(images), **TOL)


def test_clip_dense_cls_path_matches_open_clip_tokens(tiny_clip):
    """The `clip` method's patch tokens equal open_clip's own token output at the native size."""
    images = torch.randn(2, 3, 64, 64)
    visual = tiny_clip.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = visual(images)
    finally:
        visual.output_tokens = False
    want = (tokens @ visual.proj).transpose(1, 2).reshape(2, -1, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(create_method("clip", clip=tiny_clip)(images), want, **TOL)


def test_proxy_attention_empty_rows_keep_the_diagonal():
    """Where every entry of a row is masked (the official code gives NaN) the pixel attends to itself."""
    from vocabseg.methods.proxyclip import proxy_attention

    feats = torch.ones(1, 4, 2, 2)  # identical features: S = 1 everywhere, mean 1, A = gamma*(1-1.2) < 0
    attn = proxy_attention(feats, gamma=3.0, beta=1.2)
    torch.testing.assert_close(attn[0], torch.eye(4))
    feats = torch.randn(2, 8, 3, 3)
    attn = proxy_attention(feats, gamma=3.0, beta=1.2)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 9))
    assert torch.isfinite(attn).all()


def test_naclip_gaussian_std_changes_the_output(tiny_clip):
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a = create_method("naclip", clip=tiny_clip, gaussian_std=5.0)(images)
        b = create_method("naclip", clip=tiny_clip, gaussian_std=1.0)(images)
        want = ref_dense("naclip", tiny_clip, images[0], std=1.0)
    torch.testing.assert_close(b[0], want, **TOL)
    assert (a - b).abs().max() > 1e-4


def test_proxyclip_gamma_beta_and_callable_vfm(tiny_clip):
    """Any callable returning (B, C, h, w) works as a VFM (the seed tried a UNet this way)."""
    conv = torch.nn.Conv2d(3, 16, kernel_size=4, stride=4)
    images = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        got = create_method("proxyclip", clip=tiny_clip, vfm=conv, gamma=2.0, beta=1.0)(images)
        want = ref_dense("proxyclip", tiny_clip, images[0], vfm=conv, gamma=2.0, beta=1.0)
    assert got.shape[-2:] == (12, 20)
    torch.testing.assert_close(got[0], want, **TOL)


def test_vfm_must_return_nchw(tiny_clip):
    method = create_method("proxyclip", clip=tiny_clip, vfm=lambda x: x.flatten(2))
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        method(torch.randn(1, 3, 64, 64))
