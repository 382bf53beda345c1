"""Sliding windows, post-processing, PAMR and surgery against hand-computed or literal references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vocabseg.inference.config import InferenceConfig
from vocabseg.inference.pamr import PAMR
from vocabseg.inference.postprocess import class_probabilities, decide_labels
from vocabseg.inference.sliding import (
    centered_padding,
    rescaled_size,
    sliding_window_logits,
    window_boxes,
)
from vocabseg.inference.surgery import surgery_logits


# -- resize and windows --------------------------------------------------------------------------------------------
def test_rescaled_size_follows_mmcv_rescale():
    assert rescaled_size(375, 500, 336, 2048) == (336, 448)  # 500 * 336/375 = 448.0
    assert rescaled_size(500, 375, 448, 2048) == (597, 448)  # 500 * 448/375 = 597.33 -> 597
    assert rescaled_size(100, 1000, 336, 2048) == (205, 2048)  # long side capped: scale 2.048
    assert rescaled_size(10, 20, 0, 2048) == (10, 20)


def test_window_grid_matches_mmseg():
    # 336 x 448 with crop 224 / stride 112: rows (336-224+111)//112+1 = 2, cols (448-224+111)//112+1 = 3
    boxes = window_boxes(336, 448, 224, 112)
    assert boxes == [
        (0, 224, 0, 224), (0, 224, 112, 336), (0, 224, 224, 448),
        (112, 336, 0, 224), (112, 336, 112, 336), (112, 336, 224, 448),
    ]  # fmt: skip
    # last window shifted back to end at the border: 300 wide -> windows at 0 and 76
    assert [b[2:] for b in window_boxes(224, 300, 224, 112)] == [(0, 224), (76, 300)]
    # image smaller than the crop: one window, the whole image
    assert window_boxes(100, 150, 224, 112) == [(0, 100, 0, 150)]
    assert window_boxes(100, 150, 0, 112) == [(0, 100, 0, 150)]


def _toy_logits(windows: torch.Tensor) -> torch.Tensor:
    """A position-dependent, non-linear map, so averaging errors would show."""
    return torch.stack([windows.sum(1).sin(), windows[:, 0] * windows[:, 1], windows.mean(1) ** 2], dim=1)


def test_sliding_average_equals_explicit_loop():
    torch.manual_seed(0)
    image = torch.randn(3, 50, 70)
    got = sliding_window_logits([image], _toy_logits, crop=32, stride=16, batch_size=16)[0]
    want = torch.zeros(3, 50, 70)
    count = torch.zeros(50, 70)
    for y1, y2, x1, x2 in window_boxes(50, 70, 32, 16):
        want[:, y1:y2, x1:x2] += _toy_logits(image[None, :, y1:y2, x1:x2])[0]
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1
    torch.testing.assert_close(got, want / count)


def test_crop_larger_than_image_equals_whole_image():
    image = torch.randn(3, 40, 60)
    whole = sliding_window_logits([image], _toy_logits, crop=0, stride=16, batch_size=4)[0]
    big_crop = sliding_window_logits([image], _toy_logits, crop=128, stride=64, batch_size=4)[0]
    torch.testing.assert_close(big_crop, whole)
    torch.testing.assert_close(whole, _toy_logits(image[None])[0])


def test_batched_windows_equal_one_by_one_across_images_of_different_sizes(tiny_clip):
    from vocabseg.methods import create_method

    method = create_method("sclip", clip=tiny_clip).eval()
    calls = []

    def logits(windows):
        calls.append(windows.shape[0])
        with torch.no_grad():
            f = method(windows)
        return F.interpolate(f, size=windows.shape[-2:], mode="bilinear", align_corners=False)

    images = [torch.randn(3, 64, 96), torch.randn(3, 80, 64), torch.randn(3, 32, 40)]
    batched = sliding_window_logits(images, logits, crop=48, stride=16, batch_size=64)
    assert max(calls) > 1  # windows of different images really went through together
    calls.clear()
    single = [sliding_window_logits([im], logits, crop=48, stride=16, batch_size=1)[0] for im in images]
    assert max(calls) == 1
    for a, b in zip(batched, single):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_centered_padding():
    assert centered_padding(336, 336, 56) == (0, 0, 0, 0)
    assert centered_padding(300, 330, 56) == (3, 3, 18, 18)  # w 330 -> 336, h 300 -> 336
    assert centered_padding(300, 331, 56) == (2, 3, 18, 18)  # odd padding: the extra pixel goes right
    assert centered_padding(10, 10, 0) == (0, 0, 0, 0)


# -- post-processing -----------------------------------------------------------------------------------------------
def test_class_probabilities_softmax_over_all_names_then_synonym_max():
    logits = torch.tensor([[1.0], [0.5], [0.2], [0.9]]).view(4, 1, 1)  # names: a, b1, b2, c
    probs = class_probabilities(logits, logit_scale=10.0, name_to_class=[0, 1, 1, 2], num_classes=3)
    p = torch.softmax(10 * logits.view(4), 0)
    torch.testing.assert_close(probs.view(3), torch.stack([p[0], torch.max(p[1], p[2]), p[3]]))


def test_nameless_background_has_zero_probability():
    logits = torch.randn(2, 3, 3)
    probs = class_probabilities(logits, 40.0, name_to_class=[0, 1], num_classes=3)
    assert torch.all(probs[2] == 0)


def test_decide_labels_thresholds():
    # three pixels; class 2 is the background
    probs = torch.tensor([[0.7, 0.30, 0.1], [0.2, 0.25, 0.1], [0.1, 0.45, 0.0]]).view(3, 1, 3)
    assert decide_labels(probs, 2).view(-1).tolist() == [0, 2, 0]
    assert decide_labels(probs, 2, prob_threshold=0.5).view(-1).tolist() == [0, 2, 2]
    with pytest.raises(ValueError, match="background"):
        decide_labels(probs, None, prob_threshold=0.5)


def test_area_threshold_drops_small_foreground_classes():
    # 10 pixels: class 0 wins 7, class 1 wins 2, background (2) wins 1; foreground area = 9
    probs = torch.zeros(3, 1, 10)
    probs[0, 0, :7] = 0.8
    probs[1, 0, 7:9] = 0.8
    probs[1, 0, :7] = 0.1
    probs[2, 0, 9] = 0.9
    probs[2, 0, 7:9] = 0.15
    keep_both = decide_labels(probs, 2, area_threshold=0.2)  # 2/9 = 0.22 > 0.2
    assert keep_both.view(-1).tolist() == [0] * 7 + [1, 1] + [2]
    drop_small = decide_labels(probs, 2, area_threshold=0.3)  # class 1 zeroed -> background wins there
    assert drop_small.view(-1).tolist() == [0] * 7 + [2, 2] + [2]


def test_inference_config_validation_and_overrides():
    cfg = InferenceConfig()
    assert cfg.updated(crop=0, stride=None).crop == 0
    assert cfg.updated(stride=None).stride == cfg.stride
    with pytest.raises(ValueError, match="prob_threshold"):
        cfg.updated(prob_threshold=1.5)
    with pytest.raises(TypeError, match="Unknown"):
        cfg.updated(crop_size=3)


# -- PAMR -----------------------------------------------------------------------------------------------------------
def reference_pamr(image, mask, num_iter, dilations):
    """PAMR written with 3x3 shift kernels and dilated convolutions (the original formulation)."""

    def shifts(with_centre):
        ks = []
        for dy in range(3):
            for dx in range(3):
                if (dy, dx) == (1, 1) and not with_centre:
                    continue
                k = torch.zeros(1, 1, 3, 3)
                k[0, 0, dy, dx] = 1.0
                ks.append(k)
        return torch.cat(ks)

    def gather(x, kernel):
        b, c, h, w = x.shape
        outs = []
        for d in dilations:
            xp = F.pad(x.reshape(b * c, 1, h, w), [d] * 4, mode="replicate")
            outs.append(F.conv2d(xp, kernel, dilation=d))
        return torch.cat(outs, 1).reshape(b, c, -1, h, w)

    centre_first = shifts(True)
    order = [4, 0, 1, 2, 3, 5, 6, 7, 8]  # centre, then the 8 neighbours (any fixed order works for std)
    std = gather(image, centre_first[order]).std(2, keepdim=True)
    nb = shifts(False)
    aff = -(image.unsqueeze(2) - gather(image, nb)).abs() / (1e-8 + 0.1 * std)
    aff = aff.mean(1, keepdim=True).softmax(2)
    for _ in range(num_iter):
        mask = (gather(mask, nb) * aff).sum(2)
    return mask


def test_pamr_matches_reference():
    torch.manual_seed(0)
    image = torch.randn(1, 3, 20, 30)
    mask = torch.randn(1, 4, 20, 30)
    got = PAMR(5, (1, 3))(image, mask)
    torch.testing.assert_close(got, reference_pamr(image, mask, 5, (1, 3)), atol=1e-5, rtol=1e-5)
    assert (got - mask).abs().max() > 1e-3  # it really refines


def test_pamr_keeps_a_constant_mask():
    image = torch.randn(1, 3, 16, 16)
    mask = torch.full((1, 2, 16, 16), 0.25)
    torch.testing.assert_close(PAMR(3, (1, 2))(image, mask), mask)


# -- surgery --------------------------------------------------------------------------------------------------------
def test_surgery_equals_elementwise_formula():
    torch.manual_seed(0)
    feats = F.normalize(torch.randn(2, 8, 3, 4), dim=1)
    glob = F.normalize(torch.randn(2, 8), dim=-1)
    text = F.normalize(torch.randn(5, 8), dim=-1)
    cos = torch.einsum("bchw,kc->bkhw", feats, text)
    got = surgery_logits(cos, glob, text)
    # literal CLIP-Surgery: element-wise products, class-weighted, minus their class mean, summed over dims
    prob = (2 * glob @ text.T).softmax(-1)
    w = prob / prob.mean(-1, keepdim=True)
    f = feats.permute(0, 2, 3, 1).reshape(2, 12, 1, 8)
    prod = f * text.reshape(1, 1, 5, 8) * w.reshape(2, 1, 5, 1)
    want = (prod - prod.mean(2, keepdim=True)).sum(-1).reshape(2, 3, 4, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
