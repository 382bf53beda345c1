"""Any user function ``image -> binary masks`` as a mask generator (a segmenter of one's own)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .base import MaskGeneratorError, as_masks, check_image

__all__ = ["CallableMasks"]


class CallableMasks:
    """Wraps ``fn(image) -> masks``; the image is (H, W, 3) uint8 RGB, the masks anything
    :func:`~vocabseg.masks.base.as_masks` accepts (checked on every call, with messages naming
    ``fn``).

    ``identity`` names what ``fn`` computes, for caches: give one (and change it when ``fn``'s
    output would change) to let masks be cached on disk across runs; without it masks are cached in
    memory only, under this object's own identity.
    """

    def __init__(self, fn: Callable[[np.ndarray], Any], identity: str | None = None):
        if not callable(fn):
            raise MaskGeneratorError(f"The callable mask generator needs a function image -> masks; got {fn!r}.")
        self.fn = fn
        self.name = getattr(fn, "__qualname__", type(fn).__qualname__)
        self.persistent = identity is not None
        self.identity = f"callable:{identity}" if identity is not None else f"callable:{self.name}@{id(self):x}"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w = check_image(image).shape[:2]
        return as_masks(self.fn(image), (h, w), f"mask generator {self.name}")
