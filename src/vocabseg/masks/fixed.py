"""Masks given up front: the same set for every image of their size (tests, pre-computed masks)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import MaskGeneratorError, as_masks, check_image, image_digest

__all__ = ["FixedMasks"]


class FixedMasks:
    """Returns ``masks`` for every image of the masks' size (an empty list: no masks for any image).

    ``masks`` is anything :func:`~vocabseg.masks.base.as_masks` accepts: a list of (H, W) binary
    masks or one (M, H, W) array.
    """

    persistent = True  # the identity is a digest of the masks themselves

    def __init__(self, masks: Any):
        empty = isinstance(masks, (list, tuple)) and not masks
        self._masks = None if empty else as_masks(masks, None, "fixed masks")
        self.identity = "fixed:" + ("none" if self._masks is None else image_digest(self._masks))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w = check_image(image).shape[:2]
        if self._masks is None:
            return np.zeros((0, h, w), dtype=bool)
        if self._masks.shape[1:] != (h, w):
            raise MaskGeneratorError(
                f"fixed masks: the masks are {self._masks.shape[1:]} but the image is ({h}, {w}); "
                "fixed masks serve images of their own size only."
            )
        return self._masks.copy()
