"""Tiny synthetic datasets written in a benchmark's exact on-disk layout (tests, benchmarks, demos).

Images are random colour blocks; labels are blocks of random stored values in the benchmark's
stored range (before its label rule), with a band of ignore pixels, saved in the benchmark's label
format (VOC palette PNGs, grayscale trainId PNGs, 16-bit TIFFs).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .layouts import Layout
from .palettes import get_palette
from .registry import get_dataset_spec

_ID_FORMATS = {
    "voc21": "2008_{k:06d}",
    "voc20": "2008_{k:06d}",
    "context60": "2008_{k:06d}",
    "context59": "2008_{k:06d}",
    "context459": "2008_{k:06d}",
    "coco_object": "{k:012d}",
    "coco_stuff": "{k:012d}",
    "cityscapes": "{city}/{city}_000000_{k:06d}",
    "ade150": "ADE_val_{k:08d}",
    "ade847": "ADE_frame_{k:08d}",
    "folder": "image_{k:03d}",
}


def stored_value_range(name: str) -> tuple[int, int]:
    """(number of stored class values, ignore value) of a registered benchmark."""
    spec = get_dataset_spec(name)
    n = int(spec.classes.num_classes or 0)
    return n + (spec.label_rule == "reduce_zero_label"), spec.ignore_index


def write_sample(layout: Layout, root: Path, sample_id: str, image: np.ndarray, raw_label: np.ndarray) -> None:
    """Write one image and its stored label map where ``layout`` expects them."""
    image_path, label_path = layout.image_path(root, sample_id), layout.label_path(root, sample_id)
    for p in (image_path, label_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(image_path)
    if label_path.suffix == ".tif":
        Image.fromarray(raw_label.astype(np.uint16)).save(label_path, format="TIFF")
    elif layout.labels == "SegmentationClass":  # VOC stores palette PNGs
        img = Image.fromarray(raw_label.astype(np.uint8), mode="P")
        img.putpalette(get_palette("voc", 256).reshape(-1).tolist())
        img.save(label_path)
    else:
        Image.fromarray(raw_label.astype(np.uint8)).save(label_path)


def random_label(rng: np.random.Generator, size: tuple[int, int], num_values: int, ignore: int) -> np.ndarray:
    """Blocks of random values in ``0..num_values-1`` and a one-pixel ignore band."""
    h, w = size
    blocks = rng.integers(0, num_values, size=(4, 4))
    label = np.kron(blocks, np.ones((-(-h // 4), -(-w // 4)), dtype=np.int64))[:h, :w]
    label[h // 2, :] = ignore
    return label


def write_synthetic(
    name: str,
    data_root: str | os.PathLike,
    num_images: int = 4,
    size: tuple[int, int] = (40, 60),
    *,
    seed: int = 0,
    nested: bool = False,
    classes: list[str] | None = None,
) -> Path:
    """Write ``num_images`` (H, W) = ``size`` samples of benchmark ``name``; returns the dataset root.

    ``nested`` puts the dataset in the layout's first standard sub-folder (``VOCdevkit/VOC2012``...),
    to test ``--data-root`` pointing at a parent folder. ``classes`` writes a class file (``folder``,
    ``ade847``: ``classes.txt``; ``context459``: PASCAL-Context's ``labels.txt`` format).
    """
    spec = get_dataset_spec(name)
    layout = spec.layout
    root = Path(data_root) / (layout.subdirs[0] if nested and layout.subdirs else "")
    rng = np.random.default_rng(seed)
    num_values, ignore = stored_value_range(name) if spec.classes.num_classes else (len(classes or [1, 2]), 255)
    ids = [_ID_FORMATS[name].format(k=k, city=("aachen", "bremen")[k % 2]) for k in range(num_images)]
    for sample_id in ids:
        image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        write_sample(layout, root, sample_id, image, random_label(rng, size, num_values, ignore))
    if layout.split_file:
        (root / layout.split_file).parent.mkdir(parents=True, exist_ok=True)
        (root / layout.split_file).write_text("".join(f"{i}\n" for i in ids))
    if classes is not None:
        lines = [f"{i + 1}: {c}" for i, c in enumerate(classes)] if name == "context459" else classes
        (root / ("labels.txt" if name == "context459" else "classes.txt")).write_text("\n".join(lines) + "\n")
    return root


def write_synthetic_pascal5i(
    data_root: str | os.PathLike,
    num_images: int = 4,
    size: tuple[int, int] = (40, 60),
    *,
    seed: int = 0,
    hsnet_lists: bool = False,
) -> Path:
    """VOC2012 ``JPEGImages`` + ``SegmentationClassAug`` + ``val.txt``; with ``hsnet_lists`` also
    HSNet's ``splits/pascal/val/fold{i}.txt`` (every pair present, in image order)."""
    from .pascal5i import LAYOUT, NUM_FOLDS, VAL_LIST, fold_classes

    root = Path(data_root)
    rng = np.random.default_rng(seed)
    ids = [f"2007_{k:06d}" for k in range(num_images)]
    labels = {}
    for sample_id in ids:
        image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        labels[sample_id] = random_label(rng, size, 21, 255)
        write_sample(LAYOUT, root, sample_id, image, labels[sample_id])
    (root / VAL_LIST).parent.mkdir(parents=True, exist_ok=True)
    (root / VAL_LIST).write_text("".join(f"{i}\n" for i in ids))
    if hsnet_lists:
        for fold in range(NUM_FOLDS):
            lines = [f"{i}__{c:02d}" for i in ids for c in fold_classes(fold) if (labels[i] == c).any()]
            path = root / "splits/pascal/val" / f"fold{fold}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"{ln}\n" for ln in lines))
    return root
