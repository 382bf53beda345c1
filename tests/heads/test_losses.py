"""Segmentation losses against hand-computed values, including ignore and background pixels."""

from __future__ import annotations

import math

import pytest
import torch

from vocabseg.errors import UnknownNameError
from vocabseg.heads import LOSSES, binary_ce_loss, cross_entropy_loss, get_loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# K = 2 classes, one row of 4 pixels labelled [class 0, background (2), ignore (255), class 1].
L = [[1.0, -2.0, 7.0, 0.5], [0.3, 0.8, -9.0, -1.5]]  # L[class][pixel]
LOGITS = torch.tensor(L).view(1, 2, 1, 4)
TARGET = torch.tensor([[[0, 2, 255, 1]]])


def test_bce_hand_computed():
    # BCE(x, 1) = softplus(-x), BCE(x, 0) = softplus(x); the ignored pixel (column 2) is left out.
    terms = [
        softplus(-L[0][0]), softplus(L[1][0]),  # pixel 0: class 0 positive
        softplus(L[0][1]), softplus(L[1][1]),  # pixel 1: background, negative for both classes
        softplus(L[0][3]), softplus(-L[1][3]),  # pixel 3: class 1 positive
    ]  # fmt: skip
    expected = sum(terms) / (3 * 2)
    loss = binary_ce_loss(LOGITS, TARGET, ignore_index=255, background_index=2)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_ce_hand_computed():
    # Softmax over [0, l0, l1] per pixel; background's column is the fixed 0.
    def nll(pixel: int, column: int) -> float:
        logits = [0.0, L[0][pixel], L[1][pixel]]
        return -(logits[column] - math.log(sum(math.exp(v) for v in logits)))

    expected = (nll(0, 1) + nll(1, 0) + nll(3, 2)) / 3
    loss = cross_entropy_loss(LOGITS, TARGET, ignore_index=255, background_index=2)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_ce_argmax_matches_sigmoid_decision_rule():
    """argmax over [0, logits] is argmax over [0.5, sigmoid(logits)], the rule BCE heads predict with."""
    logits = torch.randn(2, 5, 7, 7) * 3
    zero = torch.zeros(2, 1, 7, 7)
    softmax_rule = torch.cat([zero, logits], 1).argmax(1)
    sigmoid_rule = torch.cat([zero + 0.5, logits.sigmoid()], 1).argmax(1)
    assert torch.equal(softmax_rule, sigmoid_rule)


@pytest.mark.parametrize("name", ["bce", "ce"])
def test_ignored_pixels_do_not_matter(name):
    loss_fn = LOSSES[name]
    logits = LOGITS.clone()
    logits[..., 2] = torch.tensor([1e4, float("inf")]).view(1, 2, 1)  # garbage under the ignored pixel
    logits.requires_grad_(True)
    loss = loss_fn(logits, TARGET, background_index=2)
    loss.backward()
    assert loss.item() == pytest.approx(loss_fn(LOGITS, TARGET, background_index=2).item(), rel=1e-6)
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[..., 2] == 0).all()


@pytest.mark.parametrize("name", ["bce", "ce"])
def test_all_ignored_is_zero_with_grad(name):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    loss = LOSSES[name](logits, target)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("name", ["bce", "ce"])
def test_matches_torch_reference_without_background(name):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 4, (2, 5, 6))
    target[0, 0, :3] = 255
    valid = target != 255
    per_image = []  # torch's own mean over each image's valid pixels, then the mean over images
    for i in range(2):
        if name == "bce":
            onehot = torch.nn.functional.one_hot(target[i].clamp(max=3), 4).permute(2, 0, 1).float()
            per = torch.nn.functional.binary_cross_entropy_with_logits(logits[i], onehot, reduction="none")
            per_image.append(per.permute(1, 2, 0)[valid[i]].mean())
        else:
            full = torch.cat([torch.zeros(1, 5, 6), logits[i]], 0)[None]
            shifted = torch.where(valid[i], target[i] + 1, torch.full_like(target[i], -100))[None]
            per_image.append(torch.nn.functional.cross_entropy(full, shifted, ignore_index=-100))
    expected = torch.stack(per_image).mean()
    torch.testing.assert_close(LOSSES[name](logits, target), expected)
    # every image weighs the same: the loss of a batch is the mean of its halves' losses (DDP = one process)
    halves = (LOSSES[name](logits[:1], target[:1]) + LOSSES[name](logits[1:], target[1:])) / 2
    torch.testing.assert_close(LOSSES[name](logits, target), halves)


def test_bad_targets_fail_loudly():
    with pytest.raises(ValueError, match="outside"):
        binary_ce_loss(LOGITS, torch.tensor([[[0, 2, 255, 1]]]))  # 2 is not a class and no background given
    with pytest.raises(ValueError, match="background_index"):
        cross_entropy_loss(LOGITS, TARGET, background_index=1)  # would collide with class 1
    with pytest.raises(ValueError, match="does not match"):
        binary_ce_loss(LOGITS, torch.zeros(1, 2, 4, dtype=torch.long))
    with pytest.raises(TypeError):
        binary_ce_loss(LOGITS, TARGET.float())


def test_registry_lookup():
    assert set(LOSSES) == {"bce", "ce"}
    assert LOSSES["bce"] is binary_ce_loss
    assert get_loss("ce") is cross_entropy_loss
    with pytest.raises(UnknownNameError, match="bce"):
        get_loss("bcee")
