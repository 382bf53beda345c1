"""PASCAL-Context ``trainval_merged.json`` -> mmseg's ``SegmentationClassContext`` PNGs.

The json (the official 59-class release) lists ``images`` (``image_id``, ``file_name``, ``phase``,
``height``, ``width``) and ``annos_segmentation`` (``image_id``, ``category_id`` in the 459-label
space, an RLE ``segmentation``). Masks are painted in annotation order; the 59 category ids are
mapped, in increasing order, to 1..59 (the alphabetical class order of ``context59.txt``) and
uncovered pixels are 0 = background (mmseg ``tools/dataset_converters/pascal_context.py``:
``_mapping`` + ``np.digitize``). Context-59 ignores 0 through ``reduce_zero_label``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ...errors import DatasetLayoutError
from ...io.files import atomic_write, atomic_write_text
from ...io.rle import decode as decode_rle

# 459-label ids of the 59 classes (PASCAL-Context labels.txt), sorted = alphabetical class order
CONTEXT59_IDS = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115, 144, 158,
    159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354, 355, 360, 366,
    368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458,
)  # fmt: skip
_TO_LABEL = {cid: i + 1 for i, cid in enumerate(CONTEXT59_IDS)}


def context_mask(height: int, width: int, annotations: list[dict]) -> np.ndarray:
    """(H, W) uint8 labels 0..59 from one image's annotations (later ones paint over earlier ones)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for ann in annotations:
        label = _TO_LABEL.get(int(ann["category_id"]))
        if label is None:
            raise ValueError(f"category_id {ann['category_id']} is not one of the 59 PASCAL-Context classes")
        region = decode_rle(ann["segmentation"])
        if region.shape != mask.shape:
            raise ValueError(f"image {ann['image_id']}: mask {region.shape} differs from the image {mask.shape}")
        mask[region.astype(bool)] = label
    return mask


def convert_context(
    json_path: str | os.PathLike,
    voc2010: str | os.PathLike,
    phases: tuple[str, ...] = ("val",),
) -> int:
    """Write ``voc2010/SegmentationClassContext/<name>.png`` and ``ImageSets/SegmentationContext/
    <phase>.txt`` for the images of ``phases``; returns the number of masks written."""
    json_path, voc2010 = Path(json_path), Path(voc2010)
    if not json_path.is_file():
        raise DatasetLayoutError(f"PASCAL-Context annotations not found: expected {json_path} (trainval_merged.json)")
    data = json.loads(json_path.read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in data["annos_segmentation"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    out_dir = voc2010 / "SegmentationClassContext"
    written = 0
    for phase in phases:
        images = sorted((im for im in data["images"] if im["phase"] == phase), key=lambda im: im["file_name"])
        if not images:
            raise DatasetLayoutError(f"{json_path} has no images of phase {phase!r}")
        for im in tqdm(images, desc=f"context {phase}"):
            mask = context_mask(im["height"], im["width"], by_image.get(im["image_id"], []))
            dst = out_dir / (Path(im["file_name"]).stem + ".png")
            atomic_write(dst, lambda f, m=mask: Image.fromarray(m).save(f, format="PNG"))
            written += 1
        names = "".join(Path(im["file_name"]).stem + "\n" for im in images)
        atomic_write_text(voc2010 / "ImageSets" / "SegmentationContext" / f"{phase}.txt", names)
    return written
