"""``CLIPVisionTower.forward_intermediates`` against a manual loop over open_clip's blocks and against
open_clip's own ``forward_intermediates``; the training-free methods built on it are unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vocabseg.methods import create_method, get_method_spec, list_methods
from vocabseg.models.vit import CLIPVisionTower

TOL = dict(atol=1e-5, rtol=1e-5)


def manual_block_outputs(clip, images: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """Every block's output (B, 1+N, D), written out from the open_clip modules, one block at a time.

    Position embeddings for a non-native grid: bicubic with scale factor (g + 0.1) / g_native.
    """
    v = clip.visual
    x = F.conv2d(images, v.conv1.weight, stride=v.conv1.stride)  # (B, D, gh, gw), conv1 has no bias
    b, d, gh, gw = x.shape
    x = torch.cat([v.class_embedding.expand(b, 1, d), x.reshape(b, d, gh * gw).transpose(1, 2)], dim=1)
    pos = v.positional_embedding
    n = int(round((pos.shape[0] - 1) ** 0.5))
    if (gh, gw) != (n, n):
        grid = pos[1:].reshape(1, n, n, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, d)])
    x = v.ln_pre(x + pos)
    outputs = []
    for block in v.transformer.resblocks:
        if getattr(v.transformer, "batch_first", True):
            x = block(x)
        else:
            x = block(x.transpose(0, 1)).transpose(0, 1)
        outputs.append(x)
    return outputs, (gh, gw)


@pytest.fixture(scope="module")
def tower(tiny_clip):
    return CLIPVisionTower(tiny_clip.visual)


@pytest.mark.parametrize("size", [(64, 64), (48, 96)])
def test_intermediates_equal_a_manual_loop_over_the_blocks(tiny_clip, tower, size):
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, want_grid = manual_block_outputs(tiny_clip, images)
        last_input, grid, kept = tower.forward_intermediates(images, [0, 1])
    assert tower.depth == 3 and len(want) == 3
    assert grid == want_grid == (size[0] // 16, size[1] // 16)
    assert len(kept) == 2
    torch.testing.assert_close(kept[0], want[0], **TOL)
    torch.testing.assert_close(kept[1], want[1], **TOL)
    torch.testing.assert_close(last_input, want[1], **TOL)  # the last block's input is block 1's output
    assert kept[0].shape == (2, 1 + grid[0] * grid[1], 64)
    assert not torch.allclose(kept[0], kept[1], atol=1e-3)  # the two blocks really differ


def test_intermediates_equal_open_clips_own_forward_intermediates(tiny_clip, tower):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = tiny_clip.visual.forward_intermediates(
            images, indices=[0, 1], intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
        )
        _, _, ours = tower.forward_intermediates(images, [0, 1])
    for mine, prefix, patches in zip(ours, theirs["image_intermediates_prefix"], theirs["image_intermediates"]):
        torch.testing.assert_close(mine, torch.cat([prefix, patches], dim=1), **TOL)


def test_negative_indices_order_and_repeats(tower):
    images = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, _, forward = tower.forward_intermediates(images, [0, 1])
        _, _, mixed = tower.forward_intermediates(images, [-2, -3, 1, 0])
        _, _, none = tower.forward_intermediates(images, [])
    assert none == []
    assert len(mixed) == 4
    # -2 is block 1 and -3 block 0 of a 3-block tower; results come in the order asked
    torch.testing.assert_close(mixed[0], forward[1], atol=0, rtol=0)
    torch.testing.assert_close(mixed[1], forward[0], atol=0, rtol=0)
    torch.testing.assert_close(mixed[2], forward[1], atol=0, rtol=0)
    torch.testing.assert_close(mixed[3], forward[0], atol=0, rtol=0)


def test_the_last_block_input_equals_tokens_before_last_block(tower):
    images = torch.randn(2, 3, 80, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x, grid = tower.tokens_before_last_block(images)
        y, grid2, kept = tower.forward_intermediates(images, [0])
    assert grid == grid2 == (5, 4)
    torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert not torch.allclose(x, kept[0], atol=1e-3)  # block 0's output is not the last block's input


@pytest.mark.parametrize("indices, bad", [([2], [2]), ([-1], [-1]), ([3], [3]), ([-4], [-4]), ([0, 5, 1, -1], [5, -1])])
def test_out_of_range_indices_name_the_valid_range(tower, indices, bad):
    """The last block (2, or -1) is never run by forward_intermediates: methods rewire it."""
    images = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"blocks 0\.\.1 \(or -3\.\.-2\)") as info:
        tower.forward_intermediates(images, indices)
    assert "3 blocks" in str(info.value)
    assert f"indices {bad} are out of range" in str(info.value)  # exactly the offending indices are named


def test_training_free_methods_are_consistent_with_the_token_path(tiny_clip, tower):
    """Every CLIP-only training-free method starts from the same last-block input; the vanilla method's
    features are ln_post + proj of the unmodified last block on that input. (Methods with a VFM, masks
    or SAM are checked in their own files.)"""
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        outputs, grid = manual_block_outputs(tiny_clip, images)
        v = tiny_clip.visual
        want = (v.ln_post(outputs[-1][:, 1:]) @ v.proj).transpose(1, 2).reshape(2, -1, *grid)
        torch.testing.assert_close(create_method("clip", tiny_clip)(images), want, **TOL)
        for name in list_methods(trainable=False):
            if get_method_spec(name).uses_vfm:
                continue
            method = create_method(name, tiny_clip)
            x, g = method.tower.tokens_before_last_block(images)
            torch.testing.assert_close(x, outputs[-2], **TOL)
            assert method(images).shape == (2, v.output_dim, *grid)
