"""COCO instance annotations (``instances_val2017.json``) -> ``*_instanceTrainIds.png`` (COCO-Object).

For users who have COCO but not the COCO-Stuff maps. Every instance is rasterised (polygons with
PIL, RLE masks decoded) and painted with its class's train id 1..80, larger instances first so
smaller ones stay visible; uncovered pixels are 0 (background), crowd regions included.

The published COCO-Object numbers use the GroupViT/TCL conversion of the COCO-Stuff maps
(:mod:`vocabseg.data.convert.coco`), whose thing pixels come from the same annotations but were
rasterised by the COCO-Stuff authors: boundaries and overlaps can differ by a few pixels, so prefer
that route to reproduce a paper.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ...errors import DatasetLayoutError
from ...io.files import atomic_write
from ...io.rle import decode as decode_rle
from .coco import THING_VALUES

# COCO category id (1..90) -> COCO-Object label (1..80)
CATEGORY_TO_LABEL = {value + 1: index + 1 for index, value in enumerate(THING_VALUES)}


def instance_region(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of one annotation: a list of polygons or an RLE dict."""
    if isinstance(segmentation, dict):
        region = decode_rle({"size": segmentation.get("size", [height, width]), "counts": segmentation["counts"]})
        return region.astype(bool)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in segmentation:
        if len(polygon) >= 6:
            draw.polygon([float(v) for v in polygon], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def instances_mask(height: int, width: int, annotations: list[dict[str, Any]]) -> np.ndarray:
    """(H, W) uint8 COCO-Object labels of one image."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for ann in sorted(annotations, key=lambda a: -float(a.get("area", 0))):
        label = CATEGORY_TO_LABEL.get(int(ann["category_id"]))
        if label is None:
            raise ValueError(f"category_id {ann['category_id']} is not one of the 80 COCO thing categories")
        region = instance_region(ann["segmentation"], height, width)
        if region.shape != mask.shape:
            raise ValueError(f"annotation {ann.get('id')}: mask {region.shape} differs from the image {mask.shape}")
        mask[region] = label
    return mask


def convert_coco_instances(
    instances_json: str | os.PathLike, out_root: str | os.PathLike, split: str = "val2017"
) -> int:
    """Write ``out_root/annotations/<split>/<image>_instanceTrainIds.png`` for every image of the json."""
    instances_json, out_root = Path(instances_json), Path(out_root)
    if not instances_json.is_file():
        raise DatasetLayoutError(f"COCO annotations not found: expected {instances_json} (instances_{split}.json)")
    data = json.loads(instances_json.read_text())
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    out_dir = out_root / "annotations" / split
    for im in tqdm(data["images"], desc=f"coco_object {split}"):
        mask = instances_mask(im["height"], im["width"], by_image.get(im["id"], []))
        dst = out_dir / f"{Path(im['file_name']).stem}_instanceTrainIds.png"
        atomic_write(dst, lambda f, m=mask: Image.fromarray(m).save(f, format="PNG"))
    return len(data["images"])
