"""Class-agnostic region masks for the methods that reason over regions (CorrCLIP, Trident).

Generators are built by name with :func:`create_mask_generator` from :data:`MASK_GENERATORS`
(never chosen by ``if`` chains) and wrapped in :class:`CachedMasks` to reuse masks across methods:

* ``sam``, ``sam2``: automatic mask generation with SAM / SAM 2 (Hugging Face ``transformers``,
  the ``masks`` extra);
* ``callable``: any function ``image -> binary masks``;
* ``fixed``: masks given up front (tests, pre-computed masks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .._names import build_by_name
from .base import MaskGenerator, MaskGeneratorError, as_masks, check_image, image_digest
from .cache import CachedMasks
from .fixed import FixedMasks
from .from_callable import CallableMasks
from .sam import MASK_MODEL_FLAG, SAM_FAMILIES, SamMasks

__all__ = [
    "MASK_GENERATORS",
    "MASK_MODEL_FLAG",
    "CachedMasks",
    "CallableMasks",
    "FixedMasks",
    "MaskGenerator",
    "MaskGeneratorError",
    "SamMasks",
    "as_masks",
    "check_image",
    "create_mask_generator",
    "image_digest",
]

#: name -> builder taking the generator's options as keywords
MASK_GENERATORS: dict[str, Callable[..., MaskGenerator]] = {
    **{family: functools.partial(SamMasks, family=family) for family in SAM_FAMILIES},
    "callable": CallableMasks,
    "fixed": FixedMasks,
}


def create_mask_generator(name: str, **options: Any) -> MaskGenerator:
    """The generator ``name`` with ``options`` (e.g. ``points_per_side=8``); unknown names and
    options are refused with the valid choices."""
    return build_by_name(MASK_GENERATORS, name, "mask generator", options)
