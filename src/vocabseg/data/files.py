"""Reading benchmark images and label maps, and writing label maps atomically.

Label maps are read as stored: palette PNGs (VOC ``SegmentationClass``) give their palette
indices, grayscale PNGs (``*_labelTrainIds.png``) their values, 16-bit TIFFs (the detectron2
``annotations_detectron2`` of ADE-847 / PASCAL-Context-459) their uint16 values. Images are read
without applying EXIF orientation: the annotations are in stored-pixel order (mmcv / PIL default).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DatasetLayoutError
from ..io.files import atomic_write
from ..io.visualize import label_image

_LABEL_MODES = {"P", "L", "I;16", "I;16L", "I;16B", "I", "1"}


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """(H, W) int64 label values of a single-channel label image."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            labels = np.asarray(img).astype(np.int64) if mode in _LABEL_MODES else None
    except FileNotFoundError:
        raise DatasetLayoutError(f"Label file missing: expected {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetLayoutError(f"{path}: unreadable label file ({exc})") from None
    if labels is None:
        raise DatasetLayoutError(
            f"{path}: a {mode} image is not a label map; expected single-channel class indices "
            "(a palette or grayscale PNG, or a 16-bit TIFF), not a colour visualisation."
        )
    return labels


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels in stored order (no EXIF rotation)."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise DatasetLayoutError(f"Image missing: expected {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetLayoutError(f"{path}: unreadable image ({exc})") from None


def save_label_png(path: str | os.PathLike, labels: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write :func:`~vocabseg.io.visualize.label_image` atomically as a PNG."""
    img = label_image(labels, palette)
    atomic_write(path, lambda f: img.save(f, format="PNG"))
