"""PASCAL-Context full labels (``trainval/<id>.mat``) -> the PC-459 layout
``annotations_detectron2/pc459_val/<id>.tif`` (16-bit labels, 65535 = ignored).

Follows CAT-Seg's ``prepare_pascal_context_459.py``: each ``.mat`` holds ``LabelMap``, the
PASCAL-Context ``labels.txt`` index 1..459 of every pixel; the label is that index - 1 (the order of
``classnames/context459.txt``) and 0 (unlabelled) becomes 65535. Only the images of the split list
are converted (CAT-Seg's ``pascalcontext_val.txt``, else mmseg's
``ImageSets/SegmentationContext/val.txt``); ids without a ``.mat`` are skipped, as CAT-Seg does.

Reading MATLAB files needs SciPy (``pip install scipy``); it is imported only here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ...errors import DatasetLayoutError
from ...io.files import atomic_write

IGNORE = 65535
NUM_CLASSES = 459
SPLIT_FILES = ("pascalcontext_val.txt", "ImageSets/SegmentationContext/val.txt")


def pc459_labels(label_map: np.ndarray) -> np.ndarray:
    """A ``LabelMap`` array (values 0..459) -> uint16 PC-459 labels (0..458, 65535 ignored)."""
    values = np.asarray(label_map).astype(np.int64)
    if values.ndim != 2:
        raise ValueError(f"LabelMap has shape {values.shape}, expected a 2-D map")
    bad = (values < 0) | (values > NUM_CLASSES)
    if bad.any():
        raise ValueError(f"LabelMap values {sorted(set(values[bad].tolist()))[:10]} are outside 0..{NUM_CLASSES}")
    return np.where(values == 0, IGNORE, values - 1).astype(np.uint16)


def read_label_map(path: Path) -> np.ndarray:
    """``LabelMap`` of one PASCAL-Context ``.mat`` file."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DatasetLayoutError(
            "Converting PASCAL-Context-459 reads MATLAB files, which needs SciPy: pip install scipy"
        ) from None
    data = loadmat(path)
    if "LabelMap" not in data:
        raise DatasetLayoutError(f"{path} has no LabelMap (expected the PASCAL-Context 459-class trainval/*.mat)")
    return data["LabelMap"]


def _split_ids(voc2010: Path, split_file: str | os.PathLike | None) -> list[str]:
    candidates = [Path(split_file)] if split_file is not None else [voc2010 / f for f in SPLIT_FILES]
    for path in candidates:
        if path.is_file():
            return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    tried = ", ".join(str(p) for p in candidates)
    raise DatasetLayoutError(f"PASCAL-Context val list not found (tried {tried}); pass --split-file FILE.")


def convert_context459(voc2010: str | os.PathLike, split_file: str | os.PathLike | None = None) -> int:
    """Write ``voc2010/annotations_detectron2/pc459_val/<id>.tif`` for every id of the val list whose
    ``voc2010/trainval/<id>.mat`` exists; returns the number written. Existing outputs are skipped,
    so an interrupted run resumes."""
    voc2010 = Path(voc2010)
    mats = voc2010 / "trainval"
    if not mats.is_dir():
        raise DatasetLayoutError(
            f"PASCAL-Context 459-class labels not found: expected {mats}/<id>.mat (from trainval.tar.gz)."
        )
    ids = _split_ids(voc2010, split_file)
    present = [i for i in ids if (mats / f"{i}.mat").is_file()]
    if not present:
        raise DatasetLayoutError(f"None of the {len(ids)} val ids has a .mat file in {mats}.")
    out_dir = voc2010 / "annotations_detectron2" / "pc459_val"
    written = 0
    for image_id in tqdm(present, desc="context459 val"):
        dst = out_dir / f"{image_id}.tif"
        if dst.is_file():
            continue
        src = mats / f"{image_id}.mat"
        try:
            labels = pc459_labels(read_label_map(src))
        except ValueError as exc:
            raise DatasetLayoutError(f"{src}: {exc}") from None
        atomic_write(dst, lambda f, lb=labels: Image.fromarray(lb).save(f, format="TIFF"))
        written += 1
    return written
