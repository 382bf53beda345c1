"""The mask-generator seam: an RGB image in, class-agnostic binary region masks out.

Methods that reason over regions (CorrCLIP's mask-constrained attention and region voting,
Trident's SAM-based aggregation) take any :class:`MaskGenerator`, so SAM, SAM 2, a user's own
segmenter or masks fixed in advance for a test are interchangeable. Every generator's output goes
through :func:`as_masks`, which turns the forms people return (lists of arrays or tensors, a stacked
array, 0/1 integers) into one (M, H, W) boolean array or says exactly what is wrong.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import VocabsegError

__all__ = ["MaskGenerator", "MaskGeneratorError", "as_masks", "check_image", "image_digest"]


class MaskGeneratorError(VocabsegError, ValueError):
    """A mask generator that cannot be used, or that returned something other than binary masks."""


@runtime_checkable
class MaskGenerator(Protocol):
    """Anything that maps an image to binary region masks.

    Attributes:
        identity: changes whenever the masks of one image would (weights, options); caches key on it.
        persistent: whether ``identity`` means the same masks in another process (False for random
            weights or an unnamed callable), i.e. whether masks may be cached on disk.
    """

    @property
    def identity(self) -> str: ...

    @property
    def persistent(self) -> bool: ...

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (M, H, W) bool, M >= 0."""
        ...


def check_image(image: Any) -> np.ndarray:
    """``image`` as a (H, W, 3) uint8 array, or a :class:`MaskGeneratorError` saying what it is."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        what = f"{type(image).__name__}" + (
            f" of shape {image.shape} and dtype {image.dtype}" if isinstance(image, np.ndarray) else ""
        )
        raise MaskGeneratorError(f"Mask generators take an (H, W, 3) uint8 RGB array; got {what}.")
    return image


def _to_numpy(mask: Any) -> np.ndarray | None:
    if hasattr(mask, "detach"):  # a torch tensor, on any device
        return mask.detach().cpu().numpy()
    try:
        return np.asarray(mask)  # arrays, PIL images, nested lists
    except Exception:
        return None


def as_masks(masks: Any, size: tuple[int, int] | None, source: str) -> np.ndarray:
    """Validate what a generator returned and make it an (M, H, W) bool array.

    Accepted: a sequence of (H, W) masks (numpy arrays, torch tensors, PIL images) or one (M, H, W)
    array/tensor; each boolean, or numeric with only the values 0 and 1. ``size`` is the image's
    (H, W) (None: the masks' own, from the first one). ``source`` names the generator in messages.
    """
    if isinstance(masks, (list, tuple)):
        items: Sequence[Any] = masks
        if size is None:
            first = _to_numpy(masks[0]) if masks else None
            size = first.shape if first is not None and first.ndim == 2 else (0, 0)
    else:
        stacked = _to_numpy(masks)
        if stacked is None or stacked.ndim != 3 or stacked.dtype == object:
            shape = stacked.shape if stacked is not None and stacked.dtype != object else None
            expected = "(H, W)" if size is None else f"({size[0]}, {size[1]})"
            raise MaskGeneratorError(
                f"{source} returned {type(masks).__name__}"
                + (f" of shape {shape}" if shape is not None else "")
                + f"; expected a list of {expected} binary masks or one (M, H, W) array."
            )
        items = list(stacked)
        size = stacked.shape[1:] if size is None else size
    h, w = size
    out = np.zeros((len(items), h, w), dtype=bool)
    for i, item in enumerate(items):
        mask = _to_numpy(item)
        if mask is None or mask.dtype == object or mask.ndim != 2:
            described = f"shape {mask.shape}" if mask is not None and mask.dtype != object else type(item).__name__
            raise MaskGeneratorError(f"{source}: mask {i} is {described}; each mask must be a 2-D ({h}, {w}) array.")
        if mask.shape != (h, w):
            raise MaskGeneratorError(
                f"{source}: mask {i} has shape {mask.shape} but the image is ({h}, {w}); masks must match the image."
            )
        if mask.dtype != bool:
            if mask.dtype.kind not in "biuf":
                raise MaskGeneratorError(f"{source}: mask {i} has dtype {mask.dtype}; masks must be boolean.")
            values = np.unique(mask)
            if not np.isin(values, (0, 1)).all():
                shown = ", ".join(str(v) for v in values[:4]) + (", ..." if len(values) > 4 else "")
                raise MaskGeneratorError(
                    f"{source}: mask {i} (dtype {mask.dtype}) holds values other than 0 and 1 ({shown}); "
                    "return boolean masks, e.g. `mask > 0`."
                )
        out[i] = mask.astype(bool, copy=False)
    return out


def image_digest(image: np.ndarray) -> str:
    """sha1 of an image's shape, dtype and pixels: the same picture gives the same digest in any process."""
    h = hashlib.sha1(f"{image.shape}:{image.dtype}:".encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()
