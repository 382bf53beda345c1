"""SA-1B as a source of label-free masks (PixelCLIP's training data).

Layout: one folder (searched recursively) of ``sa_<id>.jpg`` images, each next to ``sa_<id>.json``
holding ``image`` ``{file_name, width, height}`` and ``annotations``, a list of
``{segmentation: COCO RLE {size, counts}, area, ...}``, as the SA-1B tar files unpack.

Official preparation (PixelCLIP): 5 % of SA-1B, listed in its ``datasets/sa1b.txt``; images halved
from SA-1B's 1500 px short side to 750 (:data:`SA1B_SHORT_SIDE`); at most 512 masks per image
(:data:`MAX_MASKS`); masks of 1 pixel or fewer dropped. Which masks survive when an image has more
than 512 is not specified there; here the largest by annotated area do (ties in file order), so the
cap drops the smallest fragments first.

Memory stays bounded: the index holds file paths only, and a sample reads and RLE-decodes its own
json alone, one mask at a time, resizing each to the output size before the next is decoded (peak:
one full-size mask plus the resized stack).
"""

from __future__ import annotations

import json
import os
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
MIN_MASK_PIXELS = 2  # PixelCLIP drops masks of 1 pixel or fewer


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


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool -> ``size`` by nearest neighbour at pixel centres (PIL's ``NEAREST``)."""
    h, w = mask.shape
    if (h, w) == tuple(size):
        return mask
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]


def _load_json(path: Path) -> dict[str, Any]:
    """One annotation file (a module function so tests can count the reads)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise DatasetLayoutError(f"{path}: unreadable SA-1B annotation file ({exc})") from None


def _numeric_order(stem: str) -> tuple[int, str]:
    """``sa_2`` before ``sa_10`` (SA-1B ids are integers); other names after, alphabetically."""
    tail = stem.removeprefix("sa_")
    return (int(tail), "") if tail.isdigit() else (1 << 62, stem)


def _read_subset(path: str | os.PathLike) -> list[str]:
    """Stems (``sa_123``) of a subset list: one image per line, as ``sa_123.jpg``, ``sa_123``, a path
    ending with either, or the bare id ``123``; blank lines and ``#`` comments are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetLayoutError(f"SA-1B subset list {path}: unreadable ({exc})") from None
    stems = []
    for line in lines:
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        name = entry.replace("\\", "/").rsplit("/", 1)[-1]
        for suffix in (".jpg", ".json"):
            name = name.removesuffix(suffix)
        stems.append(name if name.startswith("sa_") else f"sa_{name}")
    return list(dict.fromkeys(stems))


class SA1BMasks(Dataset):
    """SA-1B images with their class-free masks: ``{"image", "masks", "index"}`` dicts.

    * ``image``: uint8 (3, H, W), the stored image with its short side at most ``max_short_side``;
    * ``masks``: bool (N, H, W), N <= ``max_masks``, the largest masks by area, resized (nearest)
      with the image; masks left with fewer than 2 pixels are dropped;
    * ``index``: int64 scalar, the sample's position in :attr:`images`.

    N varies per image, so batching needs a collate that pads or crops (the training engine's job).

    Args:
        root: the folder of ``sa_*.jpg`` + ``sa_*.json`` pairs (searched recursively).
        subset: a list file restricting the images (the official 5 % list, see :func:`_read_subset`
            for the accepted lines); listed images absent from ``root`` are counted in :attr:`notes`.
        max_short_side: downscale target (default: the official 750); ``None`` keeps the stored size.
        max_masks: cap on masks per image.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        subset: str | os.PathLike | None = None,
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
        unpaired = sorted(set(images) ^ set(jsons))
        if unpaired:
            shown = ", ".join(unpaired[:5]) + (", ..." if len(unpaired) > 5 else "")
            raise DatasetLayoutError(
                f"{name}: {len(unpaired)} SA-1B image(s) lack their sa_*.jpg / sa_*.json partner under "
                f"{self.root} ({shown}); each sa_<id>.jpg needs the sa_<id>.json of the same tar file."
            )
        stems = sorted(images, key=_numeric_order)
        if subset is not None:
            wanted = _read_subset(subset)
            missing = [s for s in wanted if s not in images]
            stems = [s for s in wanted if s in images]
            if missing:
                self.notes.append(f"{len(missing)} of {len(wanted)} images of subset list {subset} are absent")
        if not stems:
            where = f" listed in {subset}" if subset is not None else ""
            raise DatasetLayoutError(
                f"{name}: no SA-1B sa_*.jpg + sa_*.json pairs{where} under {self.root}; point it at the "
                "folder where the SA-1B tar files were unpacked."
            )
        self.images = [images[s] for s in stems]
        self.annotations = [jsons[s] for s in stems]

    def __len__(self) -> int:
        return len(self.images)

    def read_masks(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """bool (N, h, w) masks of image ``index`` at ``size`` (default: the stored size), the largest
        ``max_masks`` by area."""
        return self._decode(index, size)[1]

    def _decode(
        self, index: int, size: tuple[int, int] | None, image_size: tuple[int, int] | None = None
    ) -> tuple[tuple[int, int], np.ndarray]:
        """(stored (height, width), masks) from one read of the image's json; the stored size is
        checked against ``image_size`` (the decoded image's) and every mask's."""
        path = self.annotations[index]
        record = _load_json(path)
        info, annotations = record.get("image"), record.get("annotations")
        if not isinstance(info, dict) or not annotations or not isinstance(annotations, list):
            raise DatasetLayoutError(f"{path}: no 'image' record or an empty/missing 'annotations' list.")
        try:
            stored = (int(info["height"]), int(info["width"]))
            rles = [a["segmentation"] for a in annotations]
            areas = [float(a["area"]) if "area" in a else rle.area(r) for a, r in zip(annotations, rles)]
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetLayoutError(f"{path}: malformed SA-1B annotation ({exc!r})") from None
        if image_size is not None and tuple(image_size) != stored:
            raise DatasetLayoutError(
                f"{self.images[index]} is {image_size[0]}x{image_size[1]} (height x width) but {path.name} "
                f"says {stored[0]}x{stored[1]}."
            )
        out_size = stored if size is None else tuple(size)
        keep = sorted(sorted(range(len(rles)), key=lambda i: -areas[i])[: self.max_masks])  # file order
        masks = []
        for i in keep:
            try:
                mask_size = [int(v) for v in rles[i]["size"]]
                decoded = rle.decode(rles[i]) if mask_size == list(stored) else None
            except (KeyError, TypeError, ValueError) as exc:
                raise DatasetLayoutError(f"{path}: annotation {i}: unreadable RLE ({exc})") from None
            if decoded is None:
                raise DatasetLayoutError(
                    f"{path}: annotation {i} has mask size {rles[i]['size']}, but the image record says "
                    f"{list(stored)} (height, width)."
                )
            mask = resize_mask(decoded, out_size)
            if mask.sum() >= MIN_MASK_PIXELS:
                masks.append(mask)
        return stored, np.stack(masks) if masks else np.zeros((0, *out_size), dtype=bool)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} images")
        index %= len(self)
        image = read_rgb(self.images[index])
        size = scaled_size(image.shape[0], image.shape[1], self.max_short_side)
        _, masks = self._decode(index, size, image_size=image.shape[:2])
        return {
            "image": torch.from_numpy(np.array(resize_image(image, size))).permute(2, 0, 1),
            "masks": torch.from_numpy(masks),
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
