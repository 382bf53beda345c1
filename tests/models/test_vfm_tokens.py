"""The VFM wrapper's dense features are the patch tokens timm itself returns, not the prefix tokens.

Shapes alone cannot tell patch tokens from the CLS / register tokens (both give h*w tokens once the
wrong ones are sliced), so each wrapper built by ``load_vfm`` is compared value for value with
timm's own dense path on the same tiny random model: ``get_intermediate_layers(reshape=True,
norm=True)`` for DINO / DINOv2 (timm drops ``num_prefix_tokens`` there), ``forward_intermediates``
with the neck for SAM.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from vocabseg.models import load_vfm

TINY = dict(depth=1, embed_dim=32, num_heads=2)


def build(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "RANDOM weights"
        return load_vfm(name, None, **TINY, **kwargs)


def timm_patch_tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """timm's dense output of the last block: final norm, prefix tokens dropped, (B, C, h, w)."""
    (feats,) = model.get_intermediate_layers(images, n=1, reshape=True, norm=True)
    return feats


@pytest.mark.parametrize(
    "name, prefix, size, grid",
    [
        ("dino_vits16", 1, (48, 80), (3, 5)),  # CLS only
        ("dinov2_vits14_reg", 5, (56, 84), (4, 6)),  # CLS + 4 registers
    ],
)
def test_dino_features_are_timms_patch_tokens(name, prefix, size, grid):
    vfm = build(name)
    assert vfm.model.num_prefix_tokens == prefix  # the model really has prefix tokens to drop
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        got = vfm(images)
        want = timm_patch_tokens(vfm.model, images)
        tokens = vfm.model.forward_features(images)
    assert got.shape == (2, 32, *grid)
    torch.testing.assert_close(got, want)
    # the same thing spelled out: token prefix + p is patch p in row-major order
    assert tokens.shape[1] == prefix + grid[0] * grid[1]
    torch.testing.assert_close(got.flatten(2).transpose(1, 2), tokens[:, prefix:])
    # and it is not the prefix: the CLS token is no patch's feature
    assert not torch.isclose(got.flatten(2).transpose(1, 2), tokens[:, :1]).all(dim=-1).any()


def test_sam_features_are_the_neck_output_at_the_fixed_size():
    vfm = build("sam_vitb", img_size=64, global_attn_indexes=(0,), neck_chans=16)
    assert getattr(vfm.model, "num_prefix_tokens", 0) == 0  # SAM's encoder has no CLS or register token
    images = torch.randn(2, 3, 40, 50)
    resized = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        got = vfm(images)
        (want,) = vfm.model.forward_intermediates(resized, indices=1, norm=True, intermediates_only=True)
        native = vfm(resized)
    assert got.shape == (2, 16, 4, 4)  # neck channels on the 64 / 16 grid
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(native, want)  # an input already at the fixed size is not resized
