"""SA-1B as a source of label-free masks (PixelCLIP's training data).

Layout: one folder (searched recursively) of ``sa_<id>.jpg`` images and their ``sa_<id>.json``
annotations, either side by side (as the SA-1B tar files unpack) or in separate trees (PixelCLIP's
``images/sa_000020/`` + ``annotations/sa_000020/``); a json holds ``image`` ``{width, height, ...}``
and ``annotations``, a list of ``{segmentation: COCO RLE {size, counts}, area, ...}``.

Official preparation (PixelCLIP): the 100 SA-1B tar files of its ``datasets/sa1b.txt``
(:data:`PIXELCLIP_TARS`, ``subset="pixelclip"``; 10 % of SA-1B, of which its 10k steps × batch 48
see about half); images and masks halved from SA-1B's 1500 px short side to 750
(:data:`SA1B_SHORT_SIDE`, done once on disk by :mod:`vocabseg.data.sa1b_prepare`, or here per sample);
masks of 1 pixel or fewer dropped; at most 512 masks (:data:`MAX_MASKS`). Which masks survive when an
image has more than 512 is not specified there; here the largest do, so the cap drops the smallest
fragments first.

Memory stays bounded: the index holds file paths only; a sample reads its own json alone and
decodes one mask at a time, only the image columns it samples (:class:`RLEMasks`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DatasetLayoutError
from ..io import rle
from .files import read_rgb

SA1B_SHORT_SIDE = 750  # PixelCLIP's preparation halves SA-1B's 1500 px short side
MAX_MASKS = 512  # PixelCLIP MAX_MASKS
MIN_MASK_PIXELS = 2  # PixelCLIP drops masks of 1 pixel or fewer (at the mask resolution)
#: PixelCLIP's SA-1B subset (its ``datasets/sa1b.txt``): 10 runs of 10 consecutive tar files
PIXELCLIP_TARS = tuple(
    f"sa_{i:06d}" for start in (20, 130, 250, 340, 470, 490, 560, 580, 600, 710) for i in range(start, start + 10)
)
_FIX = "re-extract it from its SA-1B tar file (or rerun `python -m vocabseg.data.sa1b_prepare`)"


def scaled_size(height: int, width: int, max_short_side: int | None) -> tuple[int, int]:
    """(height, width) with the short side at most ``max_short_side`` (aspect kept; never upscaled)."""
    short = min(height, width)
    if max_short_side is None or short <= max_short_side:
        return height, width
    scale = max_short_side / short
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> ``size`` (height, width), bilinear with antialiasing (PIL)."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def nearest_index(positions: np.ndarray | int, size_in: int, size_out: int) -> np.ndarray:
    """Source index of output ``positions`` (an array, or ``n`` for ``0 .. n - 1``) when resizing
    ``size_in`` -> ``size_out`` by nearest neighbour as PIL's ``NEAREST`` does (detectron2 resizes
    masks with it): ``int(a / 2 + k a)``, ``a = in / out``, summed term by term in double precision as
    Pillow's ``ImagingScaleAffine`` does, which is ``floor((k + 0.5) a)`` except at some exact ties."""
    a = size_in / size_out
    table = np.cumsum(np.concatenate(([a * 0.5], np.full(size_out - 1, a))))  # sequential, as Pillow adds
    table = np.minimum(table.astype(np.int64), size_in - 1)
    return table[:positions] if isinstance(positions, int) else table[np.asarray(positions, dtype=np.int64)]


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool -> ``size`` by nearest neighbour at pixel centres (PIL's ``NEAREST``)."""
    h, w = mask.shape
    if (h, w) == tuple(size):
        return mask
    return mask[nearest_index(size[0], h, size[0])[:, None], nearest_index(size[1], w, size[1])[None, :]]


class RLEMasks:
    """The COCO-RLE masks of one image, decoded on demand (see :meth:`sample`).

    Args:
        rles: ``{size, counts}`` dicts, all of size ``shape``.
        shape: (height, width) of the masks.
        areas: foreground pixels of each mask (SA-1B's ``area``), for :meth:`largest`.
        source: the annotation file, named in errors.
    """

    def __init__(self, rles: Sequence[dict[str, Any]], shape: tuple[int, int], areas: Sequence[float], source: Path):
        self.rles, self.shape, self.areas, self.source = list(rles), tuple(shape), list(areas), source

    def __len__(self) -> int:
        return len(self.rles)

    def largest(self, n: int) -> RLEMasks:
        """The ``n`` largest masks by area, in file order (ties: the earlier)."""
        keep = sorted(sorted(range(len(self)), key=lambda i: -self.areas[i])[:n])
        return RLEMasks([self.rles[i] for i in keep], self.shape, [self.areas[i] for i in keep], self.source)

    def _runs(self, i: int) -> np.ndarray:
        try:
            runs = rle.runs_array(self.rles[i])
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetLayoutError(f"{self.source}: annotation {i}: unreadable RLE ({exc}); {_FIX}.") from None
        h, w = self.shape
        if int(runs.sum()) != h * w or (runs < 0).any():
            raise DatasetLayoutError(
                f"{self.source}: annotation {i}: RLE runs cover {int(runs.sum())} pixels, not {h} x {w}; {_FIX}."
            )
        return runs

    def sample(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """bool (N, len(rows), len(cols)): every mask at the grid ``rows`` x ``cols`` of its pixels.

        One mask at a time, and only the columns between ``min(cols)`` and ``max(cols)`` that the mask
        touches: its first and last foreground columns follow from the runs alone (column-major), so
        a mask outside the sampled columns is never decoded.
        """
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        h, w = self.shape
        out = np.zeros((len(self), len(rows), len(cols)), dtype=bool)
        if out.size == 0:
            return out
        lo, hi = int(cols.min()), int(cols.max())
        for i in range(len(self)):
            runs = self._runs(i)
            ends = np.cumsum(runs)
            if len(runs) < 2:
                continue  # all background
            first = int(ends[0]) // h  # the first foreground pixel starts the second run
            last = (int(ends[-1] if len(runs) % 2 == 0 else ends[-2]) - 1) // h
            c0, c1 = max(lo, first), min(hi, last)
            if c0 > c1:
                continue
            # decode columns c0..c1 only: clip every run to that window of the column-major order, which
            # read row-major is the window's transpose (column, row): whole columns, then rows, are cheap
            window = np.clip(np.stack([ends - runs, ends]), c0 * h, (c1 + 1) * h) - c0 * h
            values = np.arange(len(runs)) % 2 == 1
            decoded = np.repeat(values, window[1] - window[0]).reshape((c1 - c0 + 1, h))
            inside = (cols >= c0) & (cols <= c1)
            out[i][:, inside] = decoded[cols[inside] - c0][:, rows].T
        return out


def _load_json(path: Path) -> dict[str, Any]:
    """One annotation file (a module function so tests can count the reads)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetLayoutError(f"{path}: SA-1B annotation file missing; {_FIX}.") from None
    except (OSError, ValueError) as exc:
        raise DatasetLayoutError(f"{path}: unreadable SA-1B annotation file ({exc}); {_FIX}.") from None


def _numeric_order(stem: str) -> tuple[int, str]:
    """``sa_2`` before ``sa_10`` (SA-1B ids are integers); other names after, alphabetically."""
    tail = stem.removeprefix("sa_")
    return (int(tail), "") if tail.isdigit() else (1 << 62, stem)


def _subset_entries(subset: str | os.PathLike | Sequence[str]) -> list[str]:
    """Names of a subset: ``"pixelclip"`` (:data:`PIXELCLIP_TARS`), a list file, or a sequence of names.

    A name is an image (``sa_123.jpg``, ``sa_123``, a path ending with either, or the bare id
    ``123``) or a folder (``sa_000020``, as PixelCLIP's list names its tar files); in a file, one per
    line, blank lines and ``#`` comments skipped.
    """
    if isinstance(subset, str) and subset == "pixelclip":
        lines: Sequence[str] = PIXELCLIP_TARS
    elif isinstance(subset, (str, os.PathLike)):
        try:
            lines = Path(subset).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise DatasetLayoutError(
                f"SA-1B subset list {subset}: unreadable ({exc}); pass a text file of image ids or tar "
                "folder names, one per line, or 'pixelclip' for PixelCLIP's list."
            ) from None
    else:
        lines = list(subset)
    names = []
    for line in lines:
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        name = entry.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        for suffix in (".jpg", ".json", ".tar"):
            name = name.removesuffix(suffix)
        names.append(name if name.startswith("sa_") else f"sa_{name}")
    return list(dict.fromkeys(names))


class SA1BMasks(Dataset):
    """SA-1B images with their class-free masks: ``{"image", "masks", "index"}`` dicts.

    * ``image``: uint8 (3, H, W), the stored image with its short side at most ``max_short_side``;
    * ``masks``: bool (N, H, W), N <= ``max_masks``, the largest masks by area, resized (nearest)
      with the image; masks left with fewer than 2 pixels are dropped;
    * ``index``: int64 scalar, the sample's position in :attr:`images`.

    Training goes through :meth:`load` instead (see :class:`~vocabseg.data.mask_train.MaskTrainDataset`),
    which samples the masks at the augmented crop only.

    Args:
        root: the folder of ``sa_*.jpg`` + ``sa_*.json`` pairs (searched recursively).
        subset: restricts the images: ``"pixelclip"`` (PixelCLIP's 100 tar files), a list file or a
            sequence of image ids / folder names (see :func:`_subset_entries`); names that match
            nothing under ``root`` are counted in :attr:`notes`.
        max_short_side: downscale target (default: the official 750); ``None`` keeps the stored size.
        max_masks: cap on masks per image (here; training caps after cropping).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        subset: str | os.PathLike | Sequence[str] | None = None,
        max_short_side: int | None = SA1B_SHORT_SIDE,
        max_masks: int = MAX_MASKS,
        name: str = "sa1b",
    ) -> None:
        self.root = Path(root)
        self.max_short_side = max_short_side
        self.max_masks = max_masks
        self.name = name
        self.notes: list[str] = []
        if max_masks < 1:
            raise ValueError(f"max_masks must be at least 1, got {max_masks}")
        if max_short_side is not None and max_short_side < 1:
            raise ValueError(f"max_short_side must be a positive size or None, got {max_short_side}")
        if not self.root.is_dir():
            raise DatasetLayoutError(f"{name}: SA-1B folder not found: {self.root}")
        images = {p.stem: p for p in self.root.rglob("sa_*.jpg")}
        jsons = {p.stem: p for p in self.root.rglob("sa_*.json")}
        if images and not jsons:
            raise DatasetLayoutError(
                f"{name}: {len(images)} sa_*.jpg image(s) but no sa_*.json annotation under {self.root}; "
                "extract the SA-1B tar files whole (each holds both), or point at the folder holding both."
            )
        unpaired = sorted(set(images) ^ set(jsons))
        if unpaired:
            shown = ", ".join(unpaired[:5]) + (", ..." if len(unpaired) > 5 else "")
            raise DatasetLayoutError(
                f"{name}: {len(unpaired)} SA-1B image(s) lack their sa_*.jpg / sa_*.json partner under "
                f"{self.root} ({shown}); each sa_<id>.jpg needs the sa_<id>.json of the same tar file."
            )
        stems = sorted(images, key=_numeric_order)
        if subset is not None:
            stems = self._select(stems, images, subset)
        if not stems:
            where = f" in subset {subset}" if subset is not None else ""
            tars = sorted(p.name for p in self.root.glob("*.tar"))
            hint = (
                f"; found {len(tars)} .tar file(s) ({', '.join(tars[:3])}...): extract them first (tar -xf)"
                if tars
                else ""
            )
            raise DatasetLayoutError(
                f"{name}: no SA-1B sa_*.jpg + sa_*.json pairs{where} under {self.root}{hint}; point it at the "
                "folder where the SA-1B tar files were unpacked."
            )
        self.images = [images[s] for s in stems]
        self.annotations = [jsons[s] for s in stems]

    def _select(self, stems: list[str], images: dict[str, Path], subset: Any) -> list[str]:
        """The stems a subset names: by image name, or every image inside a named folder; list order
        of the names, numeric order within a folder."""
        names = _subset_entries(subset)
        by_folder: dict[str, list[str]] = {}
        for stem in stems:
            for part in images[stem].relative_to(self.root).parts[:-1]:
                by_folder.setdefault(part, []).append(stem)
        chosen: dict[str, None] = {}
        unmatched = 0
        for n in names:
            found = by_folder.get(n, []) + ([n] if n in images else [])
            unmatched += not found
            chosen.update(dict.fromkeys(found))
        if unmatched:
            self.notes.append(f"{unmatched} of {len(names)} names of subset {subset} match no image or folder")
        return list(chosen)

    def __len__(self) -> int:
        return len(self.images)

    def masks(self, index: int) -> RLEMasks:
        """Image ``index``'s masks as stored, undecoded (one read of its json, checked)."""
        path = self.annotations[index]
        record = _load_json(path)
        info = record.get("image") if isinstance(record, dict) else None
        annotations = record.get("annotations") if isinstance(record, dict) else None
        if not isinstance(info, dict) or not annotations or not isinstance(annotations, list):
            raise DatasetLayoutError(f"{path}: no 'image' record or an empty/missing 'annotations' list; {_FIX}.")
        try:
            stored = (int(info["height"]), int(info["width"]))
            rles = [a["segmentation"] for a in annotations]
            areas = [float(a["area"]) if "area" in a else float(rle.area(r)) for a, r in zip(annotations, rles)]
            sizes = [[int(v) for v in r["size"]] for r in rles]
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetLayoutError(f"{path}: malformed SA-1B annotation ({exc!r}); {_FIX}.") from None
        for i, size in enumerate(sizes):
            if size != list(stored):
                raise DatasetLayoutError(
                    f"{path}: annotation {i} has mask size {size}, but the image record says "
                    f"{list(stored)} (height, width); {_FIX}."
                )
        return RLEMasks(rles, stored, areas, path)

    def image(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 image ``index`` with its short side at most ``max_short_side``."""
        image = read_rgb(self.images[index])
        return resize_image(image, scaled_size(image.shape[0], image.shape[1], self.max_short_side))

    def load(self, index: int) -> tuple[np.ndarray, RLEMasks]:
        """(image, its undecoded masks): what :class:`~vocabseg.data.mask_train.MaskTrainDataset` reads.
        The masks keep their stored size; the image is checked against it before downscaling."""
        masks = self.masks(index)
        image = read_rgb(self.images[index])
        self._check_size(index, image.shape[:2], masks.shape)
        return resize_image(image, scaled_size(*image.shape[:2], self.max_short_side)), masks

    def _check_size(self, index: int, image_size: tuple[int, int], stored: tuple[int, int]) -> None:
        if tuple(image_size) != tuple(stored):
            raise DatasetLayoutError(
                f"{self.images[index]} is {image_size[0]}x{image_size[1]} (height x width) but "
                f"{self.annotations[index].name} says {stored[0]}x{stored[1]}; the image and its json come from "
                "different preparations: prepare both again."
            )

    def read_masks(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """bool (N, h, w) masks of image ``index`` at ``size`` (default: the stored size), the largest
        ``max_masks`` by area, in file order."""
        return self._resized(self.masks(index), size)

    def _resized(self, masks: RLEMasks, size: tuple[int, int] | None) -> np.ndarray:
        h, w = masks.shape
        size = (h, w) if size is None else tuple(size)
        masks = masks.largest(self.max_masks)
        out = masks.sample(nearest_index(size[0], h, size[0]), nearest_index(size[1], w, size[1]))
        return out[out.sum((1, 2)) >= MIN_MASK_PIXELS]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} images")
        index %= len(self)
        masks = self.masks(index)
        image = read_rgb(self.images[index])
        self._check_size(index, image.shape[:2], masks.shape)
        size = scaled_size(image.shape[0], image.shape[1], self.max_short_side)
        return {
            "image": torch.from_numpy(np.array(resize_image(image, size))).permute(2, 0, 1),
            "masks": torch.from_numpy(self._resized(masks, size)),
            "index": torch.tensor(index, dtype=torch.int64),
        }

    def describe(self) -> dict[str, Any]:
        """The facts of the mask source a training report must carry."""
        return {
            "dataset": self.name,
            "mask_source": "sa1b",
            "num_samples": len(self),
            "max_short_side": self.max_short_side,
            "max_masks": self.max_masks,
            "notes": list(self.notes),
        }
