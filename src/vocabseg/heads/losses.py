"""Segmentation losses for heads that output one logit map per class, looked up by name in :data:`LOSSES`.

Both take logits (B, K, H, W) (for Beyond-Labels: cos / τ, τ = 0.08) and integer targets (B, H, W)
in which a value c < K is class c, ``ignore_index`` pixels are left out, and ``background_index`` (a
value ≥ K) marks pixels that belong to none of the K classes.

* ``"bce"``: per-class binary cross-entropy, the loss that matches Beyond-Labels' per-class sigmoid
  with thresholds (Rahman et al., 2025, arXiv 2501.16769, Sec. III-E; Fusioner, Ma et al. BMVC 2022,
  trains the same way). Background pixels are negatives for every class.
* ``"ce"``: softmax cross-entropy over [background, classes] with the background logit fixed at 0.
  Its argmax is exactly the sigmoid rule "argmax over [0.5, sigmoid(logits)]" (sigmoid is monotone
  and sigmoid(0) = 0.5), so it trains the decision the BCE head is evaluated with.

Both average over each image's valid pixels (and, for BCE, the K classes), then over the images,
and return a 0-d tensor; an image whose every pixel is ignored counts 0 (with a zero gradient, never
NaN). Averaging per image first gives every image the same weight whatever its ignored area, and
makes the loss of a batch split across DDP processes (each averaging its own images, gradients then
averaged over processes) exactly the loss of the whole batch in one process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .._names import lookup

__all__ = ["LOSSES", "LossFn", "binary_ce_loss", "cross_entropy_loss", "get_loss"]

LossFn = Callable[..., torch.Tensor]


def _check(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, background_index: int | None) -> None:
    """Shapes and label values, so bad targets fail loudly instead of becoming silent negatives."""
    if logits.dim() != 4 or target.dim() != 3:
        raise ValueError(
            f"expected logits (B, K, H, W) and target (B, H, W), got {tuple(logits.shape)}, {tuple(target.shape)}"
        )
    b, k, h, w = logits.shape
    if tuple(target.shape) != (b, h, w):
        raise ValueError(f"target {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"target must hold integer labels, got {target.dtype}")
    if background_index is not None and (0 <= background_index < k or background_index == ignore_index):
        raise ValueError(
            f"background_index={background_index} must be >= K={k} and differ from ignore_index={ignore_index}"
        )
    valid = target != ignore_index
    if background_index is not None:
        valid &= target != background_index
    bad = valid & ((target < 0) | (target >= k))
    if bool(bad.any()):
        values = sorted({int(v) for v in target[bad].unique()[:5]})
        raise ValueError(
            f"target has labels {values} outside [0, {k}) that are neither ignore_index={ignore_index} "
            f"nor background_index={background_index}"
        )


def _per_image_mean(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean over images of (sum over the image's valid elements / their number); 0 for none valid."""
    return (sums / counts.clamp(min=1).to(sums.dtype)).mean()


def binary_ce_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, background_index: int | None = None
) -> torch.Tensor:
    """Mean BCE-with-logits against one-hot targets over valid pixels x K classes."""
    _check(logits, target, ignore_index, background_index)
    k = logits.shape[1]
    target = target.long()
    valid = (target != ignore_index).unsqueeze(1)  # (B, 1, H, W)
    classes = torch.arange(k, device=target.device).view(1, k, 1, 1)
    onehot = (target.unsqueeze(1) == classes).to(logits.dtype)  # background: all zeros
    per_elem = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    per_elem = torch.where(valid, per_elem, torch.zeros_like(per_elem))  # no 0·inf = NaN from ignored pixels
    return _per_image_mean(per_elem.sum(dim=(1, 2, 3)), valid.sum(dim=(1, 2, 3)) * k)


def cross_entropy_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, background_index: int | None = None
) -> torch.Tensor:
    """Mean softmax CE over [background logit 0, K class logits] on the valid pixels."""
    _check(logits, target, ignore_index, background_index)
    b, k, h, w = logits.shape
    target = target.long()
    valid = target != ignore_index
    # Zero the ignored pixels first: an inf there would give NaN gradients through log_softmax.
    logits = torch.where(valid.unsqueeze(1), logits, torch.zeros_like(logits))
    # Column 0 is the background; class c moves to column c + 1, background pixels to column 0.
    full = torch.cat([logits.new_zeros(b, 1, h, w), logits], dim=1)
    column = torch.where((target >= 0) & (target < k), target + 1, torch.zeros_like(target))
    nll = -full.log_softmax(dim=1).gather(1, column.unsqueeze(1)).squeeze(1)  # (B, H, W)
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    return _per_image_mean(nll.sum(dim=(1, 2)), valid.sum(dim=(1, 2)))


LOSSES: dict[str, LossFn] = {"bce": binary_ce_loss, "ce": cross_entropy_loss}


def get_loss(name: str) -> LossFn:
    """The loss registered as ``name`` in :data:`LOSSES` (with a did-you-mean error otherwise)."""
    return lookup(LOSSES, name, "loss")
