"""ValuePathCLIP against a literal re-computation of CAT-Seg's ``forward_dense`` with the same weights."""

import torch
import torch.nn.functional as F

from vocabseg.methods.value_path import ValuePathCLIP


def _literal_dense(clip, images):
    """CAT-Seg ``VisualTransformer.forward(dense=True)`` written out: size= bicubic positions, every
    block but the last as usual, then out_proj(v) + x_cls, MLP residual, ln_post, proj."""
    v = clip.visual
    x = v.conv1(images)
    g = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
    pos = v.positional_embedding
    n = int((pos.shape[0] - 1) ** 0.5)
    patch = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(g, g), mode="bicubic", align_corners=False)
    x = x + torch.cat([pos[:1], patch[0].reshape(pos.shape[1], -1).T], dim=0)
    x = v.ln_pre(x)
    for block in v.transformer.resblocks[:-1]:
        x = block(x)
    last = v.transformer.resblocks[-1]
    qkv = F.linear(last.ln_1(x), last.attn.in_proj_weight, last.attn.in_proj_bias)
    value = qkv.chunk(3, dim=-1)[2]
    y = F.linear(value, last.attn.out_proj.weight, last.attn.out_proj.bias) + x[:, :1]
    y = y + last.mlp(last.ln_2(y))
    out = v.ln_post(y) @ v.proj
    return out[:, 1:].transpose(1, 2).reshape(out.shape[0], -1, g, g)


def test_value_path_equals_literal_catseg_dense(tiny_clip):
    torch.manual_seed(0)
    clip = tiny_clip.eval()
    patch = clip.visual.conv1.kernel_size[0]
    native = int((clip.visual.positional_embedding.shape[0] - 1) ** 0.5)
    images = torch.randn(2, 3, patch * (native + 3), patch * (native + 3))
    with torch.no_grad():
        ours = ValuePathCLIP(clip)(images)
        ref = _literal_dense(clip, images)
    assert ours.shape == ref.shape == (2, clip.visual.proj.shape[1], native + 3, native + 3)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # the residual matters: MaskCLIP's own-token residual gives different features
    from vocabseg.methods.maskclip import MaskCLIP

    with torch.no_grad():
        assert not torch.allclose(MaskCLIP(clip)(images), ours, atol=1e-3)
