"""Resizing and sliding-window inference, batched across windows and images.

The window grid is mmseg's (``forward_slide``): ``n = max(size - crop + stride - 1, 0) // stride + 1``
windows per axis, the last one shifted back to end at the border, window logits summed and divided
by a count map. The official repos run the windows one by one at batch 1; here all windows of all
images are grouped by shape and run ``batch_size`` at a time, which gives the same numbers.

Degenerate inputs (a 10000x3 image, ``short_side=8``, a crop below the patch size) would give windows
smaller than the model's patch, which no ViT can embed. Such windows are zero-padded at the bottom and
right up to a minimum size and their logits cropped back; windows of ordinary size are untouched.

CAT-Seg's sliding window (``CATSeg.inference_sliding_window``) adds one *global view* per image: the
whole image squashed to one window, whose output is resized back and averaged with the windows'.
Here it is one more "image" of exactly one window, so it runs in the same batches as the windows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

#: names blended with the global view at once (bounds the temporary of its resize)
BLEND_NAMES = 32


def rescaled_size(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """mmcv ``rescale``: short side -> ``short_side`` unless the long side would pass ``max_long_side``.

    Each side stays at least 1 pixel: capping the long side of a 20000x1 image would round its short
    side to 0.
    """
    if short_side <= 0:
        return height, width
    scale = min(max_long_side / max(height, width), short_side / min(height, width))
    return max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (C, H, W) or (B, C, H, W) float image (no antialiasing, like cv2)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    batched = image if image.ndim == 4 else image[None]
    out = F.interpolate(batched, size=size, mode="bilinear", align_corners=False)
    return out if image.ndim == 4 else out[0]


def resize_array_pil(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL's bilinear resize of an (H, W, 3) uint8 image to ``size`` (height, width), as detectron2's
    ``ResizeTransform`` (what ``ResizeShortestEdge`` applies at test time): antialiased when shrinking,
    rounded to uint8."""
    if tuple(array.shape[:2]) == tuple(size):
        return array
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.Resampling.BILINEAR))


#: ``InferenceConfig.resize_filter`` -> (uint8 image, size, normalisation) -> normalised (3, H, W) input
_RESIZE_FILTERS: dict[
    str, Callable[[np.ndarray, tuple[int, int], Callable[[np.ndarray], torch.Tensor]], torch.Tensor]
] = {
    "bilinear": lambda array, size, normalize: resize_image(normalize(array), size),
    "pil": lambda array, size, normalize: normalize(resize_array_pil(array, size)),
}


def resized_input(
    array: np.ndarray,
    size: tuple[int, int],
    resize_filter: str,
    normalize: Callable[[np.ndarray], torch.Tensor],
) -> torch.Tensor:
    """The normalised (3, H, W) model input of an (H, W, 3) uint8 image at ``size``, resized with
    ``resize_filter`` (bilinear on the normalised image, or PIL on the uint8 one before normalising)."""
    return _RESIZE_FILTERS[resize_filter](array, size, normalize)


def window_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every window; ``crop == 0`` means one window covering the image."""
    if crop <= 0:
        return [(0, height, 0, width)]
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2 = min(r * stride + crop, height)
            x2 = min(c * stride + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


@dataclass(frozen=True)
class _Window:
    image: int
    box: tuple[int, int, int, int]


def window_logits_each(
    images: Sequence[torch.Tensor],
    window_logits: Callable[[torch.Tensor], torch.Tensor],
    crop: int,
    stride: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    min_size: tuple[int, int] = (1, 1),
) -> Iterator[tuple[int, tuple[int, int, int, int], torch.Tensor]]:
    """Every window's logits, one window at a time: ``(image index, box, (K, h, w) float32 logits)``.

    The one window loop: windows of all images are grouped by shape and run ``batch_size`` at a time
    (so they come grouped by shape, not in image order); :func:`sliding_window_logits` averages them,
    a refinement that needs each window on its own (LPOSS) keeps them. Arguments as there.
    """
    groups: dict[tuple[int, int], list[_Window]] = defaultdict(list)
    for i, image in enumerate(images):
        for box in window_boxes(image.shape[-2], image.shape[-1], crop, stride):
            groups[(box[1] - box[0], box[3] - box[2])].append(_Window(i, box))
    for windows in groups.values():
        for start in range(0, len(windows), batch_size):
            chunk = windows[start : start + batch_size]
            batch = torch.stack([images[w.image][:, w.box[0] : w.box[1], w.box[2] : w.box[3]] for w in chunk])
            logits = _padded_window_logits(batch, window_logits, min_size).float()
            for w, out in zip(chunk, logits):
                yield w.image, w.box, out
            if progress is not None:
                progress(len(chunk))


def sliding_window_logits(
    images: Sequence[torch.Tensor],
    window_logits: Callable[[torch.Tensor], torch.Tensor],
    crop: int,
    stride: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    min_size: tuple[int, int] = (1, 1),
    global_views: Sequence[torch.Tensor] = (),
    global_weight: float = 0.0,
) -> list[torch.Tensor]:
    """Average window logits over each image.

    Args:
        images: (3, H_i, W_i) tensors, sizes may differ.
        window_logits: maps a batch of windows (b, 3, h, w) to logits (b, K, h, w).
        progress: called with the number of windows done after each batch.
        min_size: (height, width) below which a window is zero-padded (bottom/right) before
            ``window_logits`` sees it; its logits are cropped back to the window.
        global_views: with ``global_weight`` > 0, one (3, h_i, w_i) image per image (CAT-Seg: the image
            before it was squashed to a square), resized to ``crop x crop`` and run as one more window;
            its output, resized to image i's size, is blended in: ``(1 - w) windows + w view``.
    Returns:
        one (K, H_i, W_i) float32 tensor per image.
    """
    views = [resize_image(v, (crop, crop)) for v in global_views] if global_weight > 0 else []
    if views and len(views) != len(images):
        raise ValueError(f"{len(views)} global views for {len(images)} images")
    every = [*images, *views]
    sums: list[torch.Tensor | None] = [None] * len(every)
    counts = [img.new_zeros(img.shape[-2:], dtype=torch.float32) for img in every]
    for i, (y1, y2, x1, x2), out in window_logits_each(
        every, window_logits, crop, stride, batch_size, progress, min_size
    ):
        if sums[i] is None:
            sums[i] = out.new_zeros((out.shape[0], *every[i].shape[-2:]))
        sums[i][:, y1:y2, x1:x2] += out
        counts[i][y1:y2, x1:x2] += 1
    averaged = [s.div_(c) for s, c in zip(sums, counts)]  # in place: with many names each is large
    view_outputs = averaged[len(images) :]
    del averaged[len(images) :]
    for i in reversed(range(len(view_outputs))):  # each view blended into its image, then let go
        _blend(averaged[i], view_outputs.pop(), global_weight)
    return averaged


def _blend(target: torch.Tensor, view: torch.Tensor, weight: float) -> None:
    """``target = (1 - weight) target + weight view`` with ``view`` (K, h, w) resized (bilinear) to the
    target's size, ``BLEND_NAMES`` names at a time, in place."""
    for start in range(0, target.shape[0], BLEND_NAMES):
        part = resize_image(view[None, start : start + BLEND_NAMES], tuple(target.shape[-2:]))[0]
        target[start : start + BLEND_NAMES].mul_(1 - weight).add_(part, alpha=weight)


def _padded_window_logits(
    batch: torch.Tensor, window_logits: Callable[[torch.Tensor], torch.Tensor], min_size: tuple[int, int]
) -> torch.Tensor:
    """``window_logits`` of windows padded up to ``min_size``, cropped back to the windows' size."""
    h, w = batch.shape[-2:]
    pad_h, pad_w = max(min_size[0] - h, 0), max(min_size[1] - w, 0)
    if not (pad_h or pad_w):
        return window_logits(batch)
    return window_logits(F.pad(batch, (0, pad_w, 0, pad_h)))[..., :h, :w]


def centered_padding(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding up to a multiple (ProxyCLIP ``compute_padsize``)."""
    if multiple <= 0:
        return 0, 0, 0, 0
    pad_w = -width % multiple
    pad_h = -height % multiple
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2
