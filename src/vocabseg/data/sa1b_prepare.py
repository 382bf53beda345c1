"""PixelCLIP's SA-1B preparation: images and masks halved once on disk (short side 1500 -> 750).

PixelCLIP trains on SA-1B with images and annotations resized to half, because decoding the
full-size RLE masks bottlenecks its data loader. Training here also works on the stored SA-1B files
(``SA1BMasks`` halves the image per sample and samples the masks at the crop's pixels only), so this
step is optional; it saves that per-sample downscale and shrinks the data about 3x on disk.

``python -m vocabseg.data.sa1b_prepare SA1B_DIR OUT_DIR --subset pixelclip --workers 8``

writes every selected ``sa_<id>.jpg`` / ``sa_<id>.json`` under ``OUT_DIR`` at the same relative path:
the image with its short side at ``--short-side`` (bilinear, JPEG quality ``--quality``), each mask
resized by nearest neighbour at pixel centres and encoded again (COCO RLE), with ``area`` and
``bbox`` recomputed and ``point_coords`` / ``crop_box`` scaled. Files are written atomically and
pairs already in ``OUT_DIR`` are skipped, so an interrupted run simply restarts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DatasetLayoutError, VocabsegError
from ..io import rle
from ..io.files import atomic_write, atomic_write_text
from .sa1b import SA1B_SHORT_SIDE, RLEMasks, SA1BMasks, nearest_index, resize_image, scaled_size


def _box(mask: np.ndarray) -> list[float]:
    """COCO ``[x, y, width, height]`` of a mask's foreground (zeros when empty)."""
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(ys) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs[0]), float(ys[0]), float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1)]


def prepare_pair(data: SA1BMasks, index: int, out_root: Path, short_side: int, quality: int) -> bool:
    """Write the downscaled image ``index`` of ``data`` and its annotation under ``out_root``;
    ``False`` when both exist already."""
    image_out = out_root / data.images[index].relative_to(data.root)
    json_out = out_root / data.annotations[index].relative_to(data.root)
    if image_out.is_file() and json_out.is_file():
        return False
    image, masks = data.load(index)  # checks the json and the image's size (max_short_side is None)
    record = json.loads(data.annotations[index].read_text(encoding="utf-8"))
    (h, w), (new_h, new_w) = masks.shape, scaled_size(*masks.shape, short_side)
    rows, cols = nearest_index(new_h, h, new_h), nearest_index(new_w, w, new_w)
    sy, sx = new_h / h, new_w / w
    for i, annotation in enumerate(record["annotations"]):
        mask = RLEMasks([masks.rles[i]], masks.shape, [0.0], masks.source).sample(rows, cols)[0]
        annotation.update(segmentation=rle.encode(mask), area=int(mask.sum()), bbox=_box(mask))
        if annotation.get("point_coords"):
            annotation["point_coords"] = [[x * sx, y * sy] for x, y in annotation["point_coords"]]
        if annotation.get("crop_box"):
            x, y, bw, bh = annotation["crop_box"]
            annotation["crop_box"] = [x * sx, y * sy, bw * sx, bh * sy]
    record["image"].update(height=new_h, width=new_w)
    buffer = io.BytesIO()
    Image.fromarray(resize_image(image, (new_h, new_w))).save(buffer, format="JPEG", quality=quality)
    atomic_write(image_out, lambda f: f.write(buffer.getvalue()))
    atomic_write_text(json_out, json.dumps(record))  # last: a pair counts as done once its json exists
    return True


def _prepare_chunk(args: tuple[Any, ...]) -> int:
    root, subset, indices, out_root, short_side, quality = args
    data = SA1BMasks(root, subset=subset, max_short_side=None)
    return sum(prepare_pair(data, i, Path(out_root), short_side, quality) for i in indices)


def prepare_sa1b(
    src_root: str | os.PathLike,
    out_root: str | os.PathLike,
    *,
    subset: str | os.PathLike | Sequence[str] | None = None,
    short_side: int = SA1B_SHORT_SIDE,
    quality: int = 95,
    workers: int = 1,
) -> int:
    """Downscale SA-1B under ``src_root`` into ``out_root`` (see the module docstring); returns the
    number of pairs written. ``subset``: as :class:`~vocabseg.data.sa1b.SA1BMasks` takes it."""
    src_root, out_root = Path(src_root), Path(out_root)
    if out_root.resolve().is_relative_to(src_root.resolve()):
        raise DatasetLayoutError(
            f"out_root {out_root} is inside the source folder {src_root}, where its images would be found "
            "again as SA-1B images: pick a folder outside it."
        )
    data = SA1BMasks(src_root, subset=subset, max_short_side=None)
    if workers <= 1:
        return sum(prepare_pair(data, i, out_root, short_side, quality) for i in range(len(data)))
    chunks = [range(start, len(data), workers) for start in range(workers)]
    jobs = [(src_root, subset, list(c), out_root, short_side, quality) for c in chunks]
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(_prepare_chunk, jobs))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vocabseg.data.sa1b_prepare",
        description="Halve SA-1B images and masks on disk as PixelCLIP does (short side 1500 -> 750).",
    )
    parser.add_argument("src_root", help="folder of the unpacked SA-1B tar files (sa_*.jpg + sa_*.json)")
    parser.add_argument("out_root", help="output folder (same relative paths)")
    parser.add_argument("--subset", default=None, help="'pixelclip', or a file of image ids / tar folder names")
    parser.add_argument("--short-side", type=int, default=SA1B_SHORT_SIDE, help="default: 750")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default: 95)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    args = parser.parse_args(argv)
    try:
        n = prepare_sa1b(
            args.src_root,
            args.out_root,
            subset=args.subset,
            short_side=args.short_side,
            quality=args.quality,
            workers=args.workers,
        )
    except VocabsegError as exc:
        print(f"sa1b_prepare: error: {exc}", file=sys.stderr)
        return 2
    print(f"{n} image(s) written to {args.out_root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
