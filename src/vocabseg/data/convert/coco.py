"""COCO-Stuff164k stuff+thing maps -> ``*_labelTrainIds.png`` (COCO-Stuff) and
``*_instanceTrainIds.png`` (COCO-Object).

Input: the official ``stuffthingmaps_trainval2017`` PNGs under ``annotations/<split>/<id>.png``,
whose value is the COCO category id - 1 (things 0..89 with gaps, stuff 91..181) and 255 = unlabelled.

* COCO-Stuff (mmseg ``tools/dataset_converters/coco_stuff164k.py``): the 80 things -> 0..79, the
  91 stuff classes -> 80..170, 255 stays 255 (ignored).
* COCO-Object (GroupViT / TCL ``convert_dataset/convert_coco_object.py``, used by SCLIP's
  ``datasets/cvt_coco_object.py``): the 80 things -> 1..80; stuff **and unlabelled** -> 0
  (background), so COCO-Object has no ignored pixels.

Values that are not COCO categories (the 11 unused ids) are refused rather than passed through.
"""

from __future__ import annotations

import os
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ...errors import DatasetLayoutError
from ...io.files import atomic_write

# stuffthingmaps values (COCO category id - 1) of the 80 things, in train-id order
THING_VALUES = (
    *range(0, 11), *range(12, 25), 26, 27, *range(30, 44), *range(45, 65), 66, 69, *range(71, 82), *range(83, 90),
)  # fmt: skip
STUFF_VALUES = tuple(range(91, 182))
UNLABELLED = 255
INVALID = -1


def _lut(things: np.ndarray, stuff: np.ndarray, unlabelled: int) -> np.ndarray:
    lut = np.full(256, INVALID, dtype=np.int64)
    lut[list(THING_VALUES)] = things
    lut[list(STUFF_VALUES)] = stuff
    lut[UNLABELLED] = unlabelled
    return lut


TARGETS = {
    "coco_stuff": ("_labelTrainIds.png", _lut(np.arange(80), np.arange(80, 171), 255)),
    "coco_object": ("_instanceTrainIds.png", _lut(np.arange(1, 81), np.zeros(91, dtype=np.int64), 0)),
}


def convert_mask(raw: np.ndarray, target: str) -> np.ndarray:
    """A stuffthingmaps array -> the ``target`` benchmark's uint8 train ids."""
    lut = TARGETS[target][1]
    out = lut[raw.astype(np.int64)]
    if (out == INVALID).any():
        bad = sorted(set(np.unique(raw[out == INVALID]).tolist()))
        raise ValueError(f"values {bad} are not COCO-Stuff categories (expected stuffthingmaps PNGs)")
    return out.astype(np.uint8)


def _convert_file(src: Path, out_dir: Path, target: str) -> None:
    try:
        mask = convert_mask(np.asarray(Image.open(src)), target)
    except ValueError as exc:
        raise ValueError(f"{src}: {exc}") from None
    dst = out_dir / f"{src.stem}{TARGETS[target][0]}"
    atomic_write(dst, lambda f: Image.fromarray(mask).save(f, format="PNG"))


def convert_coco(
    coco_root: str | os.PathLike,
    target: str,
    splits: tuple[str, ...] = ("val2017",),
    out_root: str | os.PathLike | None = None,
    workers: int = 1,
) -> int:
    """Convert every raw map of ``coco_root/annotations/<split>/``; returns the number written.

    Output goes next to the inputs (``out_root`` = ``coco_root``), as the mmseg / GroupViT scripts do.
    """
    coco_root, out_root = Path(coco_root), Path(out_root or coco_root)
    total = 0
    for split in splits:
        src_dir = coco_root / "annotations" / split
        files = sorted(p for p in src_dir.glob("*.png") if "TrainIds" not in p.name) if src_dir.is_dir() else []
        if not files:
            raise DatasetLayoutError(
                f"No COCO-Stuff stuffthingmaps PNGs in {src_dir} (expected annotations/{split}/<image id>.png from "
                "stuffthingmaps_trainval2017.zip)."
            )
        out_dir = out_root / "annotations" / split
        out_dir.mkdir(parents=True, exist_ok=True)
        job = partial(_convert_file, out_dir=out_dir, target=target)
        if workers > 1:
            with Pool(workers) as pool:
                list(tqdm(pool.imap_unordered(job, files, chunksize=16), total=len(files), desc=f"{target} {split}"))
        else:
            for f in tqdm(files, desc=f"{target} {split}"):
                job(f)
        total += len(files)
    return total
