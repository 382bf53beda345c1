"""Label colours for saved predictions, one named palette per dataset family.

VOC uses its bit-interleaving colour map (background black, aeroplane ``(128, 0, 0)``...), so a
prediction PNG opens with the same colours as ``SegmentationClass``; Cityscapes uses its official
19 train-id colours. The other benchmarks use vocabseg's deterministic class colours (the fixed
150/171-entry lists of mmseg are not reproduced).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .._names import lookup
from ..io.visualize import class_colors, voc_colormap

# Cityscapes train ids 0..18 (cityscapesScripts ``labels.py``)
CITYSCAPES_COLORS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip


def _fit(colors: np.ndarray, num_classes: int) -> np.ndarray:
    """The first ``num_classes`` colours, padded with vocabseg's class colours if too few."""
    if len(colors) >= num_classes:
        return colors[:num_classes]
    return np.concatenate([colors, class_colors(num_classes)[len(colors) :]])


PALETTES: dict[str, Callable[[int], np.ndarray]] = {
    "voc": lambda n: _fit(voc_colormap(256), n),  # label i = VOC class i (0 = background)
    "voc_no_background": lambda n: _fit(voc_colormap(256)[1:], n),  # label i = VOC class i + 1
    "cityscapes": lambda n: _fit(np.array(CITYSCAPES_COLORS, dtype=np.uint8), n),
    "binary": lambda n: _fit(np.array([(0, 0, 0), (255, 255, 255)], dtype=np.uint8), n),
    "generic": lambda n: class_colors(n),
}


def get_palette(name: str, num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours of palette ``name``."""
    return lookup(PALETTES, name, "palette")(num_classes)
