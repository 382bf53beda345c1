"""Tiny synthetic datasets written in a benchmark's exact on-disk layout (tests, benchmarks, demos).

Images are random colour blocks; labels are blocks of random stored values in the benchmark's
stored range (before its label rule), with a band of ignore pixels, saved in the benchmark's label
format (VOC palette PNGs, grayscale trainId PNGs, 16-bit TIFFs).

:func:`write_synthetic_pascal5i_shapes` is different: its classes have a learnable look, for tests
that train a model and expect it to get better.
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .files import save_label_png
from .layouts import Layout
from .palettes import get_palette
from .registry import get_dataset_spec

_ID_FORMATS = {
    "voc21": "2008_{k:06d}",
    "voc20": "2008_{k:06d}",
    "voc20b": "2008_{k:06d}",
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
    else:  # VOC stores palette PNGs, the others grayscale
        palette = get_palette("voc", 256) if layout.labels == "SegmentationClass" else None
        save_label_png(label_path, raw_label, palette)


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


# -- learnable PASCAL-5i-style shapes ------------------------------------------------------------------
SHAPE_STRIPE = 4  # half-period of the class textures, in pixels


def shape_class_colour(cls: int) -> np.ndarray:
    """RGB colour (float, 0..255) of VOC class ``cls`` (1..20): 10 hues 36 degrees apart, each bright
    (classes 1..10) and dark (11..20)."""
    k = cls - 1
    return np.array(colorsys.hsv_to_rgb((k % 10) / 10, 0.9, 1.0 if k < 10 else 0.55)) * 255


def shape_class_texture(cls: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float texture of class ``cls``: its colour, darkened on a class-specific pattern
    (horizontal / vertical / diagonal stripes, checker: ``(cls - 1) % 4``) at a random phase.

    Classes with neighbouring hues, or the same hue, have different patterns, so colour and texture
    both separate the 20 classes even after hue / brightness jitter."""
    h, w = size
    yy, xx = np.mgrid[:h, :w] + rng.integers(0, 2 * SHAPE_STRIPE, size=(2, 1, 1))
    on = [yy // SHAPE_STRIPE, xx // SHAPE_STRIPE, (xx + yy) // SHAPE_STRIPE, yy // SHAPE_STRIPE + xx // SHAPE_STRIPE]
    dark = (on[(cls - 1) % 4] % 2).astype(np.float64)
    return shape_class_colour(cls) * (1 - 0.45 * dark)[..., None]


def _background_texture(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth, nearly grey blotches: unlike any class colour."""
    h, w = size
    coarse = rng.uniform(60, 190, size=(4, 4, 1)) + rng.uniform(-8, 8, size=(1, 1, 3))
    return np.kron(coarse, np.ones((-(-h // 4), -(-w // 4), 1)))[:h, :w]


def _shape_mask(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A filled rectangle or disc, 1/4 to 1/2 of the short side across, inside the image."""
    h, w = size
    side = int(rng.integers(max(2, min(h, w) // 4), max(3, min(h, w) // 2) + 1))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    yy, xx = np.mgrid[:h, :w]
    if rng.random() < 0.5:
        sh, sw = side, int(rng.integers(max(2, side // 2), side + 1))
        return (yy >= top) & (yy < top + sh) & (xx >= left) & (xx < left + sw)
    r = side / 2
    return (yy - top - r + 0.5) ** 2 + (xx - left - r + 0.5) ** 2 <= r * r


def shapes_image(
    classes: list[int], size: tuple[int, int], rng: np.random.Generator, min_pixels: int = 24
) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (H, W, 3), VOC label map) with one shape per class on a background texture, later
    shapes on top, 255 on a 1-px band along every outline; each class keeps ``min_pixels`` labelled."""
    for _ in range(100):
        image, label = _background_texture(size, rng), np.zeros(size, dtype=np.int64)
        for cls in classes:
            mask = _shape_mask(size, rng)
            image[mask] = shape_class_texture(cls, size, rng)[mask]
            label[mask] = cls
        edge = np.zeros(size, dtype=bool)
        edge[:, :-1] |= label[:, :-1] != label[:, 1:]
        edge[:-1, :] |= label[:-1, :] != label[1:, :]
        label[edge] = 255
        if all((label == c).sum() >= min_pixels for c in classes):
            break
    image = image + rng.normal(0, 6, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def _class_lists(n: int, rng: np.random.Generator) -> list[list[int]]:
    """1-3 distinct classes per image, dealt from shuffled decks of the 20 classes, so every class
    appears once the split has 20 shapes (at most 20 images)."""
    deck: list[int] = []
    lists = []
    for _ in range(n):
        picked: list[int] = []
        for _ in range(int(rng.integers(1, 4))):
            if not deck:
                deck = [int(c) for c in rng.permutation(20) + 1]
            cls = next((c for c in deck if c not in picked), None)
            if cls is not None:
                deck.remove(cls)
                picked.append(cls)
        lists.append(picked)
    return lists


def write_synthetic_pascal5i_shapes(
    data_root: str | os.PathLike,
    num_train: int,
    num_val: int,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    hsnet_lists: bool = False,
) -> Path:
    """A learnable PASCAL-5i: VOC2012 ``JPEGImages`` + ``SegmentationClassAug`` +
    ``ImageSets/Segmentation/{train_aug,val}.txt``; returns the dataset root.

    Each image shows 1-3 shapes (rectangles, discs) of distinct VOC classes on a grey background;
    a class's colour and stripe / checker texture (:func:`shape_class_texture`) identify it locally,
    so a small head can learn them in seconds. Every class appears in a split of 20 or more images.
    Train ids are ``2008_*``, val ids ``2007_*``. ``hsnet_lists`` also writes HSNet's
    ``splits/pascal/{trn,val}/fold{i}.txt`` (every present pair, in image order).
    """
    from .pascal5i import LAYOUT, NUM_FOLDS, VAL_LIST, fold_classes

    root = Path(data_root)
    rng = np.random.default_rng(seed)
    splits = {"trn": ("2008", num_train, "train_aug.txt"), "val": ("2007", num_val, Path(VAL_LIST).name)}
    for split, (year, num, list_name) in splits.items():
        ids, present = [f"{year}_{k:06d}" for k in range(num)], {}
        for sample_id, classes in zip(ids, _class_lists(num, rng)):
            image, label = shapes_image(classes, size, rng)
            write_sample(LAYOUT, root, sample_id, image, label)
            present[sample_id] = set(np.unique(label).tolist())
        list_path = root / Path(VAL_LIST).parent / list_name
        list_path.parent.mkdir(parents=True, exist_ok=True)
        list_path.write_text("".join(f"{i}\n" for i in ids))
        for fold in range(NUM_FOLDS) if hsnet_lists else ():
            lines = [f"{i}__{c:02d}" for i in ids for c in fold_classes(fold) if c in present[i]]
            path = root / "splits/pascal" / split / f"fold{fold}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"{ln}\n" for ln in lines))
    return root
