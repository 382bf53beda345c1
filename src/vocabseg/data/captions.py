"""Image-caption training data: a CSV/TSV list, COCO Captions, or img2dataset WebDataset shards.

ViL-Seg (Liu et al., ECCV 2022) learns segmentation from image-caption pairs alone (CC12M in the
paper; CC3M, CC12M or COCO Captions here). Every source gives the same samples:

* ``image``: float32 (3, G, G), the global view of DINO's multi-crop (:class:`MultiCrop`);
* ``local_crops``: float32 (n, 3, L, L), the n local views;
* ``caption``: str, whitespace-normalised;

and :func:`collate_captions` batches them as ``{"image": (B, 3, G, G), "local_crops": (B, n, 3, L, L),
"caption": [B str]}`` (every dataset's ``collate_fn``).

Sources:

* :func:`build_caption_list`: a ``path<TAB>caption`` file (``.tsv``; ``.csv`` is comma-separated with
  CSV quoting), paths relative to the file, an optional header row naming the columns;
* :func:`build_coco_captions`: ``annotations/captions_train2017.json`` + ``train2017/``;
* :class:`CaptionShards`: WebDataset tar shards as img2dataset writes them (``{key}.jpg`` +
  ``{key}.txt`` (+ ``{key}.json``) members), streamed.

The first two are indexed: ``dataset[(index, seed)]`` draws every random choice (crops, flips, which
of an image's captions) from ``seed``, so the trainer resumes them exactly. The shards are a stream:
each epoch permutes the shards, splits them across processes and loader workers
(:func:`vocabseg.train.sampler.shard_plan`), reads each worker's shards in order through a shuffle
buffer, and seeds each sample from (seed, epoch, shard, position in the shard); the trainer resumes it
at a shard boundary (exact to the shard, not to the sample). A broken image or an empty caption
inside a shard is skipped and counted (:attr:`CaptionShards.skipped`, the run's ``data/skipped``
metric), never fatal; a wrong layout or a missing file is a :class:`~vocabseg.errors.DatasetLayoutError`.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import importlib
import json
import os
import random
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from ..errors import DatasetLayoutError, ImageLoadError, SettingsError
from ..eval.distributed import world_info
from ..io.images import load_image
from ..models.clip import OPENAI_MEAN, OPENAI_STD
from ..train.sampler import StreamProgress, mix_seed, shard_plan

__all__ = [
    "MULTICROP_OPTIONS",
    "SKIP_REASONS",
    "MultiCrop",
    "multicrop_from_options",
    "collate_captions",
    "CaptionDataset",
    "build_caption_list",
    "build_coco_captions",
    "CaptionShards",
    "expand_shards",
    "caption_list_train",
    "coco_captions_train",
    "caption_shards_train",
]

#: the recipe ``data.options`` keys that shape the local views (the global view's are ``data.crop``/``data.scale``)
MULTICROP_OPTIONS = ("local_crops", "local_size", "local_scale")
#: why a shard sample is skipped: the keys of :attr:`CaptionShards.skipped`
SKIP_REASONS = ("broken_image", "empty_caption", "no_caption", "no_image", "broken_shard")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset --encode_format
MAX_FALLBACKS = 10  # an indexed dataset's unreadable image: the next entries tried before giving up
LAYOUT_PROBE = 32  # shard samples read before a shard where none pairs an image and a caption is a layout error
_PATH_HEADERS = {"path", "filepath", "file", "filename", "image", "image_path", "img", "jpg"}
_CAPTION_HEADERS = {"caption", "captions", "title", "text", "txt", "caption_text"}
_COCO_DIRS = ("", "coco", "coco2017", "mscoco")


# -- multi-crop ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultiCrop:
    """DINO's multi-crop views (Caron et al., ICCV 2021, ``DataAugmentationDINO``), as ViL-Seg uses them:
    one global view and ``num_local`` low-resolution local views (the paper: 1 + 6).

    Each view is a random resized crop (area fraction in ``*_scale``, aspect ratio in [3/4, 4/3],
    bicubic with antialiasing, DINO's defaults: global 224 px at (0.4, 1), local 96 px at (0.05, 0.4)),
    flipped with p = 0.5, then normalised with ``mean``/``std`` (OpenAI CLIP's). DINO's colour jitter,
    blur and solarisation are left out: the ViL-Seg paper does not list them, and its clustering loss
    draws its own photometric transform inside the model.
    """

    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    num_local: int = 6
    flip: bool = True
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __post_init__(self) -> None:
        for name in ("global_size", "local_size"):
            if int(getattr(self, name)) < 1:
                raise SettingsError(f"multi-crop {name} must be a positive size in pixels, got {getattr(self, name)}.")
        for name in ("global_scale", "local_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise SettingsError(
                    f"multi-crop {name} must be an area fraction range 0 < low <= high <= 1, got {[low, high]}."
                )
        if self.num_local < 0:
            raise SettingsError(f"multi-crop local_crops must be >= 0, got {self.num_local}.")

    def __call__(self, image: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) uint8 RGB -> the global view (3, G, G) and local views (n, 3, L, L), float32, normalised.
        Every random number comes from ``seed``, whatever the process or global RNG state."""
        array = np.require(image, dtype=np.uint8, requirements=["C", "W"])  # PIL's arrays are read-only
        pixels = torch.from_numpy(array).permute(2, 0, 1)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(int(seed))
            global_view = self._view(pixels, self.global_size, self.global_scale)
            local_views = [self._view(pixels, self.local_size, self.local_scale) for _ in range(self.num_local)]
        local = torch.stack(local_views) if local_views else pixels.new_zeros(0, 3, self.local_size, self.local_size)
        return self._normalise(global_view), self._normalise(local)

    def _view(self, pixels: torch.Tensor, size: int, scale: tuple[float, float]) -> torch.Tensor:
        """One random resized crop of the uint8 image, resized in 8 bits as DINO's PIL path does (bicubic
        with antialiasing, rounded and clamped to 0..255; torch's uint8 kernel is also ~3x faster)."""
        box = self._croppers[size, scale].make_params([pixels])
        view = F.resized_crop(pixels, **box, size=[size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        if self.flip and bool(torch.rand(()) < 0.5):
            view = view.flip(-1)
        return view

    @cached_property
    def _croppers(self) -> dict[tuple[int, tuple[float, float]], v2.RandomResizedCrop]:
        """The crop-box samplers (built once: building one costs as much as a small resize)."""
        return {
            (size, scale): v2.RandomResizedCrop(size, scale=scale)
            for size, scale in ((self.global_size, self.global_scale), (self.local_size, self.local_scale))
        }

    def _normalise(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 views -> float32 ``(v / 255 - mean) / std``."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return ((views.to(torch.float32) / 255 - mean) / std).contiguous()


def multicrop_from_options(
    options: Mapping[str, Any],
    *,
    global_size: int,
    global_scale: tuple[float, float] | None = None,
    flip: bool = True,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
) -> MultiCrop:
    """A :class:`MultiCrop` from a recipe: the global view from ``data.crop`` and ``data.scale``
    (``global_scale``; None: DINO's), the local views from ``data.options`` (:data:`MULTICROP_OPTIONS`,
    DINO's by default), flips from ``data.flip``, the CLIP model's normalisation."""
    defaults = MultiCrop()
    scale = defaults.global_scale if global_scale is None else tuple(global_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise SettingsError(
            f"data.scale is the global view's crop area fraction for caption data (DINO: [0.4, 1.0]); it must "
            f"be 0 < low <= high <= 1, got {list(scale)}."
        )
    try:
        return MultiCrop(
            global_size=int(global_size),
            global_scale=(float(scale[0]), float(scale[1])),
            local_size=int(options.get("local_size", defaults.local_size)),
            local_scale=_pair(options.get("local_scale", defaults.local_scale), "local_scale"),
            num_local=int(options.get("local_crops", defaults.num_local)),
            flip=bool(flip),
            mean=tuple(mean),
            std=tuple(std),
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, SettingsError):
            raise
        raise SettingsError(f"data.options for the multi-crop: {exc}") from None


def _pair(value: Any, name: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise SettingsError(f"data.options.{name} must be a pair [low, high], got {value!r}.")
    return float(value[0]), float(value[1])


def clean_caption(text: str) -> str:
    """A caption with its whitespace runs collapsed to single spaces ('' when there are no words)."""
    return " ".join(text.split())


def collate_captions(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"image": (B, 3, G, G), "local_crops": (B, n, 3, L, L), "caption": [B str]}``."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "local_crops": torch.stack([s["local_crops"] for s in samples]),
        "caption": [s["caption"] for s in samples],
    }


def _sample(image: np.ndarray, caption: str, transform: MultiCrop, seed: int) -> dict[str, Any]:
    global_view, local = transform(image, seed)
    return {"image": global_view, "local_crops": local, "caption": caption}


# -- indexed sources: a caption list, COCO Captions ---------------------------------------------------------


class CaptionDataset(Dataset):
    """Indexed image-caption samples (see the module docstring for the sample format).

    ``dataset[(index, seed)]`` derives the crops, flips and the choice among an image's captions from
    ``seed`` alone (a resumed run replays them); ``dataset[index]`` draws a seed from torch's global RNG.
    An unreadable image is replaced by the next entry's (up to :data:`MAX_FALLBACKS` tries), with a
    warning naming the file, so one bad file does not end a long run.

    Args:
        entries: (image path, its captions) pairs; with several captions one is drawn per sample.
        transform: the multi-crop.
        name: the dataset's name in messages and :meth:`describe`.
        notes: facts a training report should state.
    """

    def __init__(
        self,
        entries: Sequence[tuple[Path, Sequence[str]]],
        transform: MultiCrop,
        *,
        name: str = "captions",
        notes: Sequence[str] = (),
    ) -> None:
        self.entries = [(Path(p), tuple(c)) for p, c in entries]
        self.transform = transform
        self.name = name
        self.notes = list(notes)
        if not self.entries:
            raise DatasetLayoutError(f"{name}: no image-caption pairs.")
        if any(not c for _, c in self.entries):
            raise ValueError("every entry needs at least one caption")

    collate_fn = staticmethod(collate_captions)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = (key[0], key[1]) if isinstance(key, (tuple, list)) else (key, None)
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} samples")
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        first = None
        for attempt in range(MAX_FALLBACKS):
            path, captions = self.entries[(index + attempt) % len(self)]
            try:
                image = load_image(path)
            except ImageLoadError as exc:
                first = first or exc
                warnings.warn(f"{self.name}: skipping an unreadable image ({exc}); using the next entry.", stacklevel=2)
                continue
            caption = captions[mix_seed(seed, 1) % len(captions)]
            return _sample(image, caption, self.transform, int(seed))
        raise ImageLoadError(
            f"{self.name}: {MAX_FALLBACKS} consecutive unreadable images from entry {index} on (first: {first}); "
            "check the image files, or remove their entries."
        )

    def describe(self) -> dict[str, Any]:
        """The facts of the training data a checkpoint or report must carry."""
        return {
            "dataset": self.name,
            "num_samples": len(self),
            "num_captions": sum(len(c) for _, c in self.entries),
            "transforms": asdict(self.transform),
            "notes": list(self.notes),
        }


def _missing_files(paths: Sequence[Path]) -> list[Path]:
    """The paths that are not files, listing each folder once (fast for millions of images)."""
    listings: dict[Path, set[str]] = {}
    missing = []
    for p in paths:
        parent = p.parent
        if parent not in listings:
            try:
                listings[parent] = {e.name for e in os.scandir(parent) if e.is_file()}
            except OSError:
                listings[parent] = set()
        if p.name not in listings[parent]:
            missing.append(p)
    return missing


def _check_present(paths: Sequence[Path], name: str, source: str, fix: str) -> None:
    missing = _missing_files(paths)
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DatasetLayoutError(
            f"{name}: {len(missing)} of {len(paths)} images listed in {source} are missing ({shown}); {fix}"
        )


def _delimiter(path: Path, delimiter: str | None) -> str:
    if delimiter is not None:
        if len(delimiter) != 1:
            raise SettingsError(f"delimiter must be one character (e.g. '\\t' or ','), got {delimiter!r}.")
        return delimiter
    return "," if path.suffix.lower() == ".csv" else "\t"


def build_caption_list(
    path: str | os.PathLike,
    transform: MultiCrop,
    *,
    delimiter: str | None = None,
    name: str = "caption_csv",
) -> CaptionDataset:
    """A :class:`CaptionDataset` from a ``path<TAB>caption`` list.

    One pair per line: the image path (relative to the list's folder, or absolute), then the caption.
    ``.csv`` files are comma-separated with CSV quoting; other files (``.tsv``, ``.txt``) split each line
    at its first tab, so a caption may hold any character but a newline. A first row whose columns are
    named (``filepath``/``path``/``image`` and ``caption``/``title``/``text``, as open_clip's CSVs) is a
    header and picks the columns; otherwise columns 1 and 2 are read and further ones ignored.
    Blank lines are skipped; rows with an empty caption are skipped and counted in ``notes``.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(
            f"{name}: caption list not found: {path}. Give the list with data.options.file (relative to "
            "--data-root), one 'image path<TAB>caption' line per pair, image paths relative to the list."
        )
    sep = _delimiter(path, delimiter)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if sep == "\t":
                rows = [line.rstrip("\r\n").split("\t") for line in f]
            else:
                rows = list(csv.reader(f, delimiter=sep))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetLayoutError(f"{name}: {path}: unreadable caption list ({exc}); it must be UTF-8 text.") from None
    numbered = [(i + 1, r) for i, r in enumerate(rows) if any(cell.strip() for cell in r)]
    columns, start = (0, 1), 0
    if numbered:
        first = numbered[0][1]
        header = [cell.strip().lower() for cell in first]
        path_col = next((i for i, h in enumerate(header) if h in _PATH_HEADERS), None)
        caption_col = next((i for i, h in enumerate(header) if h in _CAPTION_HEADERS), None)
        if path_col is not None and caption_col is not None and not (path.parent / first[path_col]).is_file():
            columns, start = (path_col, caption_col), 1
    if sep == "\t" and columns == (0, 1):  # no named columns: everything after the first tab is the caption
        numbered = [(line, [row[0], "\t".join(row[1:])] if len(row) > 1 else row) for line, row in numbered]
    entries, empty = [], 0
    for line, row in numbered[start:]:
        if len(row) <= max(columns):
            raise DatasetLayoutError(
                f"{name}: {path}, line {line}: expected 'image path{'<TAB>' if sep == chr(9) else sep}caption', "
                f"got {sep.join(row)!r}. Is the delimiter right (data.options.delimiter)?"
            )
        image, caption = row[columns[0]].strip(), clean_caption(row[columns[1]])
        if not image:
            raise DatasetLayoutError(f"{name}: {path}, line {line}: empty image path.")
        if not caption:
            empty += 1
            continue
        entries.append((path.parent / image, (caption,)))
    if not entries:
        raise DatasetLayoutError(f"{name}: {path} lists no image-caption pairs.")
    _check_present(
        [p for p, _ in entries],
        name,
        str(path),
        "image paths are relative to the list's folder; fix or remove those rows.",
    )
    notes = [f"{empty} row(s) with an empty caption skipped"] if empty else []
    return CaptionDataset(entries, transform, name=name, notes=notes)


def build_coco_captions(
    data_root: str | os.PathLike,
    transform: MultiCrop,
    *,
    split: str = "train2017",
    captions: str = "random",
    name: str = "coco_captions",
) -> CaptionDataset:
    """COCO Captions: ``annotations/captions_<split>.json`` and the ``<split>/`` images (or
    ``images/<split>/``), under ``data_root`` or its ``coco/`` folder.

    ``captions="random"``: one sample per image, its caption drawn from the sample seed among the
    image's (about 5), so a batch never holds one image twice (no false negatives for the contrastive
    loss); ``"all"``: one sample per image-caption pair.
    """
    if captions not in ("random", "all"):
        raise SettingsError(f"captions must be 'random' (one sample per image) or 'all' (per pair), got {captions!r}.")
    data_root = Path(data_root)
    annotation = Path("annotations") / f"captions_{split}.json"
    candidates = list(dict.fromkeys(data_root / d if d else data_root for d in _COCO_DIRS))
    root = next((c for c in candidates if (c / annotation).is_file()), None)
    if root is None:
        raise DatasetLayoutError(
            f"{name}: COCO Captions not found: expected {annotation} in {' or '.join(str(c) for c in candidates)}. "
            f"Unpack annotations_trainval2017.zip and {split}.zip (cocodataset.org) so that the folder holds "
            f"annotations/ and {split}/."
        )
    images_dir = next((d for d in (root / split, root / "images" / split) if d.is_dir()), None)
    if images_dir is None:
        raise DatasetLayoutError(
            f"{name}: the {split} images are missing: expected the folder {root / split} "
            f"(or {root / 'images' / split}) next to {annotation}; unpack {split}.zip there."
        )
    try:
        record = json.loads((root / annotation).read_text(encoding="utf-8"))
        files = {int(im["id"]): str(im["file_name"]) for im in record["images"]}
        by_image: dict[int, list[str]] = {}
        for ann in record["annotations"]:
            by_image.setdefault(int(ann["image_id"]), []).append(clean_caption(str(ann["caption"])))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetLayoutError(
            f"{name}: {root / annotation} is not a COCO captions file ({exc!r}); expected 'images' and "
            "'annotations' with image_id and caption."
        ) from None
    entries, no_caption = [], 0
    for image_id in sorted(files):
        texts = [c for c in by_image.get(image_id, []) if c]
        if not texts:
            no_caption += 1
            continue
        if captions == "random":
            entries.append((images_dir / files[image_id], tuple(texts)))
        else:
            entries.extend((images_dir / files[image_id], (t,)) for t in texts)
    _check_present(
        [p for p, _ in entries], name, str(root / annotation), f"unpack all of {split}.zip into {images_dir}."
    )
    notes = [f"{no_caption} image(s) without a caption skipped"] if no_caption else []
    return CaptionDataset(entries, transform, name=name, notes=notes)


# -- WebDataset shards (img2dataset) ------------------------------------------------------------------------


def _webdataset() -> Any:
    try:
        import webdataset
    except ImportError:
        raise DatasetLayoutError(
            "Reading WebDataset shards needs the webdataset package: pip install 'vocabseg[train]'."
        ) from None
    return webdataset


def _is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def expand_shards(spec: str | Sequence[str], data_root: str | os.PathLike | None = None) -> list[str]:
    """Shard paths or URLs from a folder (its ``*.tar``), a brace pattern (``cc3m/{00000..00331}.tar``),
    a glob (``cc3m/*.tar``), a ``::``-separated list, or a list of any of these. Local paths are taken
    relative to ``data_root``; URLs (``https://``, ``pipe:``...) pass through as webdataset opens them."""
    root = Path(data_root) if data_root is not None else Path()
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in items:
        item = os.fspath(item)
        if _is_url(item):
            urls.extend(_webdataset().shardlists.expand_urls(item))
            continue
        for part in _webdataset().shardlists.expand_urls(item):
            path = root / part
            if path.is_dir():
                tars = sorted(p for p in path.iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz")))
                if not tars:
                    raise DatasetLayoutError(
                        f"No .tar shards in {path}. Point data.options.shards (or --data-root) at the folder "
                        "img2dataset wrote with --output_format webdataset, or give a pattern such as "
                        "'{00000..00331}.tar'."
                    )
                urls.extend(str(p) for p in tars)
            elif glob.has_magic(str(path)):
                found = sorted(glob.glob(str(path)))
                if not found:
                    raise DatasetLayoutError(f"No shard matches {path}; check data.options.shards.")
                urls.extend(found)
            else:
                urls.append(str(path))
    if not urls:
        raise DatasetLayoutError(f"No shards given ({spec!r}); set data.options.shards.")
    return urls


def _check_tar(path: str) -> str | None:
    """Why ``path`` is not a readable tar (or gzip) shard, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if head[:2] == b"\x1f\x8b" or head[257:262] == b"ustar" or (len(head) == 512 and not any(head)):
        return None  # gzip, a ustar/GNU/pax header, or an empty archive's zero block
    return "not a tar file"


class CaptionShards(IterableDataset):
    """img2dataset WebDataset shards as a stream of multi-crop samples (see the module docstring).

    Members are grouped by key with webdataset's tar readers; a sample needs an image
    (``.jpg``/``.jpeg``/``.png``/``.webp``) and a non-empty ``.txt`` caption; others are skipped and
    counted by reason (:data:`SKIP_REASONS`), as are images that do not decode and the unread rest of a
    shard that breaks off (``broken_shard``, with a warning; a tar cut exactly between two members
    cannot be told from a shorter shard). A shard in which none of the first samples pairs an image with
    a caption is a layout error: it was written without ``--caption_col``, or is not img2dataset's
    output. Decoding happens after the shuffle buffer, which holds encoded bytes.

    Standalone use (``for sample in shards`` or a ``DataLoader``): set the epoch with :meth:`set_epoch`;
    the process's rank and world size come from ``torch.distributed`` / torchrun's environment (or
    :meth:`set_rank`), the worker from the DataLoader. The trainer instead drives :meth:`read_shards`
    through :class:`~vocabseg.train.sampler.ShardBatchStream` (this class is a
    :class:`~vocabseg.train.sampler.ShardStream`), which also keeps :attr:`skipped` up to date with its
    loader workers' counts.

    Args:
        shards: shard paths or URLs (see :func:`expand_shards`).
        transform: the multi-crop.
        shuffle_buffer: samples held for shuffling (webdataset's ``shuffle``); 0 or 1 reads in order.
        shuffle_shards: permute the shard order every epoch.
        seed: the standalone iteration's seed (the trainer passes the recipe's).
        check: check at construction that every local shard exists and starts like a tar file.
    """

    def __init__(
        self,
        shards: Sequence[str],
        transform: MultiCrop,
        *,
        shuffle_buffer: int = 2000,
        shuffle_shards: bool = True,
        seed: int = 0,
        name: str = "caption_shards",
        check: bool = True,
    ) -> None:
        _webdataset()
        self.urls = [str(s) for s in shards]
        self.transform = transform
        self.shuffle_buffer = int(shuffle_buffer)
        self.shuffle_shards = bool(shuffle_shards)
        self.seed = int(seed)
        self.name = name
        self.notes: list[str] = []
        self.skipped: Counter[str] = Counter()
        self.epoch = 0
        self._rank: tuple[int, int] | None = None
        if not self.urls:
            raise DatasetLayoutError(f"{name}: no shards.")
        if self.shuffle_buffer < 0:
            raise SettingsError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}.")
        if check:
            bad = [(u, why) for u in self.urls if not _is_url(u) and (why := _check_tar(u))]
            if bad:
                shown = "; ".join(f"{u}: {why}" for u, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
                raise DatasetLayoutError(
                    f"{name}: {len(bad)} of {len(self.urls)} shard(s) cannot be read ({shown}). Check "
                    "data.options.shards (a folder, a pattern such as '{00000..00331}.tar' or a glob) against "
                    "the files img2dataset wrote (--output_format webdataset)."
                )

    collate_fn = staticmethod(collate_captions)

    @property
    def num_shards(self) -> int:
        return len(self.urls)

    @property
    def shard_fingerprint(self) -> str:
        """A digest of the shard names (not their folder), so a moved shard set still resumes."""
        names = "\n".join(u.rstrip("/").rsplit("/", 1)[-1] for u in self.urls)
        return hashlib.sha1(names.encode()).hexdigest()[:16]

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next standalone iteration reads (its shard order and sample seeds)."""
        self.epoch = int(epoch)

    def set_rank(self, rank: int, world_size: int) -> None:
        """Read as process ``rank`` of ``world_size`` (default: from ``torch.distributed`` / torchrun)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of size {world_size}")
        self._rank = (int(rank), int(world_size))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = self._rank or (world_info().rank, world_info().world_size)
        info = get_worker_info()
        shards = shard_plan(
            self.num_shards,
            seed=self.seed,
            epoch=self.epoch,
            rank=rank,
            world_size=world,
            worker=info.id if info is not None else 0,
            num_workers=info.num_workers if info is not None else 1,
            shuffle=self.shuffle_shards,
        )
        yield from self.read_shards(self.seed, self.epoch, shards, StreamProgress(skipped=self.skipped))

    def read_shards(
        self, seed: int, epoch: int, shards: Sequence[int], progress: StreamProgress
    ) -> Iterator[dict[str, Any]]:
        """The samples of ``shards`` (indices into :attr:`urls`), read in order through the shuffle
        buffer (its draws seeded by (seed, epoch, shards)); ``progress`` is current as of each yield."""
        rng = random.Random(mix_seed(seed, epoch, *shards))
        buffer: list[tuple[int, int, bytes, str]] = []
        for item in self._raw(shards, progress):
            if self.shuffle_buffer <= 1:
                sample = self._decode(item, seed, epoch, progress)
                if sample is not None:
                    yield sample
                continue
            buffer.append(item)
            if len(buffer) < self.shuffle_buffer:
                continue
            sample = self._decode(_pop_random(buffer, rng), seed, epoch, progress)
            if sample is not None:
                yield sample
        while buffer:
            sample = self._decode(_pop_random(buffer, rng), seed, epoch, progress)
            if sample is not None:
                yield sample

    def _raw(self, shards: Sequence[int], progress: StreamProgress) -> Iterator[tuple[int, int, bytes, str]]:
        """(shard, position in the shard, encoded image, caption) of each usable sample, shard by shard."""
        wds = _webdataset()
        for shard in shards:
            url = self.urls[shard]
            progress.opened.append(shard)
            errors: list[BaseException] = []

            def handler(exc: BaseException, errors: list[BaseException] = errors) -> bool:
                errors.append(exc)
                return True  # go on: what could be read of the shard is used

            try:
                stream = importlib.import_module("webdataset.gopen").gopen(url)  # files, pipe:, http(s)://, ...
            except (OSError, ValueError) as exc:  # e.g. a remote shard that cannot be fetched: counted, not fatal
                handler(exc)
                stream = None
            sources = [{"url": url, "stream": stream}] if stream is not None else []
            members = wds.tariterators.group_by_keys(
                wds.tariterators.tar_file_expander(sources, handler=handler), handler=handler
            )
            try:
                yield from self._usable(shard, url, members, progress)
            finally:
                if stream is not None:
                    stream.close()
            if errors:
                progress.skipped["broken_shard"] += 1
                warnings.warn(
                    f"{self.name}: {url}: reading stopped early ({errors[0]!r}); the rest of this shard is skipped.",
                    stacklevel=2,
                )

    def _usable(
        self, shard: int, url: str, members: Iterator[dict[str, Any]], progress: StreamProgress
    ) -> Iterator[tuple[int, int, bytes, str]]:
        """The samples of one shard that have an image and a non-empty caption; the others are counted."""
        seen = with_image = with_caption = paired = 0
        sample: dict[str, Any] = {}
        for position, sample in enumerate(members):
            seen += 1
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            text = sample.get("txt")
            with_image += ext is not None
            with_caption += text is not None
            paired += ext is not None and text is not None
            if seen >= LAYOUT_PROBE and not paired:
                break
            if ext is None:
                progress.skipped["no_image"] += 1
            elif text is None:
                progress.skipped["no_caption"] += 1
            elif not (caption := clean_caption(bytes(text).decode("utf-8", errors="replace"))):
                progress.skipped["empty_caption"] += 1
            else:
                yield shard, position, sample[ext], caption
        if seen and not paired:
            found = sorted({k for k in sample if not k.startswith("__")})
            if not with_image or not with_caption:
                what = f"has a {'.txt caption' if with_image else 'image (.jpg/.png/.webp)'} member"
            else:
                what = "pairs an image with a .txt caption under one key (are they in different folders?)"
            raise DatasetLayoutError(
                f"{self.name}: {url}: no sample of the first {seen} {what}; members of the last one: "
                f"{', '.join('.' + k for k in found) or 'none'}. Expected img2dataset's webdataset output: "
                "{key}.jpg + {key}.txt (+ {key}.json) per sample; write it with --output_format webdataset "
                "--caption_col <your caption column>."
            )

    def _decode(
        self, item: tuple[int, int, bytes, str], seed: int, epoch: int, progress: StreamProgress
    ) -> dict[str, Any] | None:
        shard, position, data, caption = item
        try:
            image = load_image(data)
        except ImageLoadError:
            progress.skipped["broken_image"] += 1
            return None
        return _sample(image, caption, self.transform, mix_seed(seed, epoch, shard, position))

    @property
    def shard_sizes(self) -> list[int] | None:
        """Samples per shard as img2dataset reported writing them (``<shard>_stats.json`` "successes"),
        when every shard has that file next to it; else None. Read once."""
        if not hasattr(self, "_shard_sizes"):
            sizes: list[int] | None = []
            for url in self.urls:
                stats = Path(url.removesuffix(".gz").removesuffix(".tgz").removesuffix(".tar") + "_stats.json")
                try:
                    sizes.append(int(json.loads(stats.read_text())["successes"]))  # type: ignore[union-attr]
                except (OSError, ValueError, KeyError, TypeError):
                    sizes = None
                    break
            self._shard_sizes = sizes
        return self._shard_sizes

    def estimated_samples(self) -> int | None:
        """The number of samples img2dataset reported writing (see :attr:`shard_sizes`), or None."""
        return sum(self.shard_sizes) if self.shard_sizes is not None else None

    def describe(self) -> dict[str, Any]:
        """The facts of the training data a checkpoint or report must carry (``skipped``: this process's
        count, which the trainer's stream keeps up to date with its loader workers')."""
        return {
            "dataset": self.name,
            "num_shards": self.num_shards,
            "first_shard": self.urls[0],
            "estimated_samples": self.estimated_samples(),
            "shuffle_buffer": self.shuffle_buffer,
            "shuffle_shards": self.shuffle_shards,
            "resume": "exact to the shard, not to the sample",
            "skipped": {reason: int(self.skipped.get(reason, 0)) for reason in SKIP_REASONS},
            "transforms": asdict(self.transform),
            "notes": list(self.notes),
        }


def _pop_random(buffer: list[Any], rng: random.Random) -> Any:
    """Take a uniformly drawn item out of ``buffer`` (swap with the last, pop: O(1))."""
    k = rng.randrange(len(buffer))
    buffer[k], buffer[-1] = buffer[-1], buffer[k]
    return buffer.pop()


# -- the trainer's TRAIN_DATA entries (vocabseg.train.tasks) -------------------------------------------------

#: ``data.options`` each entry reads
CAPTION_LIST_OPTIONS = ("file", "delimiter", *MULTICROP_OPTIONS)
COCO_CAPTIONS_OPTIONS = ("split", "captions", *MULTICROP_OPTIONS)
CAPTION_SHARDS_OPTIONS = ("shards", "shuffle_buffer", "shuffle_shards", *MULTICROP_OPTIONS)
CAPTION_LIST_NAMES = ("captions.tsv", "captions.csv")  # looked for in --data-root without data.options.file


def _recipe_multicrop(config: Any, transforms: Any) -> MultiCrop:
    """The multi-crop of a recipe's ``DataConfig`` and its ``TrainTransforms`` (crop, scale, flip, CLIP's
    mean / std); the segmentation-crop settings (``cat_max_ratio``, ``photometric``) do not apply."""
    return multicrop_from_options(
        config.options,
        global_size=transforms.crop,
        global_scale=transforms.scale,
        flip=transforms.flip,
        mean=transforms.mean,
        std=transforms.std,
    )


def caption_list_train(config: Any, data_root: str | os.PathLike, transforms: Any) -> CaptionDataset:
    """``caption_csv``: ``data.options.file`` under ``--data-root`` (default: ``--data-root`` itself when it
    is a file, else its ``captions.tsv`` or ``captions.csv``)."""
    root = Path(data_root)
    file = config.options.get("file")
    if file is not None:
        path = root / str(file)
    elif root.is_file():
        path = root
    else:
        path = next((root / n for n in CAPTION_LIST_NAMES if (root / n).is_file()), root / CAPTION_LIST_NAMES[0])
    return build_caption_list(path, _recipe_multicrop(config, transforms), delimiter=config.options.get("delimiter"))


def coco_captions_train(config: Any, data_root: str | os.PathLike, transforms: Any) -> CaptionDataset:
    """``coco_captions``: COCO Captions under ``--data-root`` (``split``, ``captions`` options)."""
    return build_coco_captions(
        data_root,
        _recipe_multicrop(config, transforms),
        split=str(config.options.get("split", "train2017")),
        captions=str(config.options.get("captions", "random")),
    )


def caption_shards_train(config: Any, data_root: str | os.PathLike, transforms: Any) -> CaptionShards:
    """``caption_shards``: ``data.options.shards`` (a folder, brace pattern, glob or list, relative to
    ``--data-root``); default: ``--data-root`` itself (a folder of img2dataset ``.tar`` shards, or a pattern)."""
    options = config.options
    spec = options.get("shards")
    urls = expand_shards(str(data_root)) if spec is None else expand_shards(spec, data_root)
    buffer, shuffle = options.get("shuffle_buffer", 2000), options.get("shuffle_shards", True)
    if isinstance(buffer, bool) or not isinstance(buffer, int):
        raise SettingsError(f"data.options.shuffle_buffer must be a number of samples, got {buffer!r}.")
    if not isinstance(shuffle, bool):
        raise SettingsError(f"data.options.shuffle_shards must be true or false, got {shuffle!r}.")
    return CaptionShards(urls, _recipe_multicrop(config, transforms), shuffle_buffer=buffer, shuffle_shards=shuffle)
