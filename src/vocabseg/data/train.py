"""Training data: (image, label) pairs under joint random augmentation, reproducible per sample.

The augmentation is mmseg's segmentation training pipeline, built from ``torchvision.transforms.v2``
so image and mask always move together (bilinear resize for the image, nearest for the
``tv_tensors.Mask``):

1. random resize: the short side becomes ``base_size * r``, ``r`` uniform in ``scale`` (mmseg
   ``RandomResize(scale=(2048, base), ratio_range=scale, keep_ratio=True)`` for usual aspect ratios);
2. random crop of ``crop x crop`` (smaller where the image is smaller), redrawn up to 10 times until no
   single class covers more than ``cat_max_ratio`` of its supervised pixels (mmseg ``RandomCrop``);
3. horizontal flip with p = 0.5;
4. photometric distortion (mmseg ``PhotoMetricDistortion``), each step with p = 0.5: brightness
   +-32/255 (added), contrast x[0.5, 1.5] (pixel values scaled, as mmseg does; before or after the
   colour steps at random), saturation x[0.5, 1.5] (torchvision's blend with grey), hue +-18/180 of
   the colour circle (OpenCV's 18 hue units);
5. CLIP normalisation, then padding to ``crop x crop`` at the bottom / right with 0 (the mean colour,
   as mmseg pads normalised images) and ``ignore_index`` in the label.

Exact resume needs the same crops again: ``dataset[(index, seed)]`` draws every random number of the
sample from ``seed`` alone, whatever the process, DataLoader worker or global RNG state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..errors import DatasetLayoutError
from ..models.clip import OPENAI_MEAN, OPENAI_STD
from ..text.vocabulary import Vocabulary
from .dataset import SegDataset, apply_label_rule, check_same_size
from .files import read_label_map, read_rgb
from .layouts import Sample

CROP_TRIES = 10  # mmseg RandomCrop's retries for cat_max_ratio


@dataclass(frozen=True)
class TrainTransforms:
    """The joint training augmentation (see the module docstring for each step).

    Attributes:
        crop: the square output size.
        scale: range of the random resize ratio ``r`` (short side = ``base_size * r``); ``None`` keeps
            the stored size.
        base_size: the short side at ``r = 1`` (default: ``crop``).
        cat_max_ratio: largest fraction of a crop's supervised pixels one class may cover; 1.0 disables.
        flip: random horizontal flip.
        photometric: mmseg's photometric distortion.
        mean, std: normalisation of the [0, 1] RGB image (OpenAI CLIP's by default).
    """

    crop: int
    scale: tuple[float, float] | None = (0.5, 2.0)
    base_size: int | None = None
    cat_max_ratio: float = 0.75
    flip: bool = True
    photometric: bool = True
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __post_init__(self) -> None:
        if self.crop < 1:
            raise ValueError(f"crop must be a positive size, got {self.crop}")
        if self.scale is not None and not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be a range 0 < low <= high, got {self.scale}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")

    def __call__(self, image: np.ndarray, label: np.ndarray, ignore_index: int = 255) -> tuple[torch.Tensor, ...]:
        """(H, W, 3) uint8 image and (H, W) class indices -> float32 (3, crop, crop) normalised image
        and int64 (crop, crop) labels. Random numbers come from torch's global generator."""
        img = tv_tensors.Image(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(np.array(label, dtype=np.int64)))
        if self.scale is not None:
            base = self.base_size or self.crop
            low, high = max(1, round(base * self.scale[0])), max(1, round(base * self.scale[1]))
            img, mask = v2.RandomResize(low, high + 1)(img, mask)
        top, left, height, width = self._crop_box(mask, ignore_index)
        img, mask = F.crop(img, top, left, height, width), F.crop(mask, top, left, height, width)
        if self.flip:
            img, mask = v2.RandomHorizontalFlip(0.5)(img, mask)
        pixels = F.to_dtype(img, torch.float32, scale=True).as_subclass(torch.Tensor)
        if self.photometric:
            pixels = photometric_distortion(pixels)
        pixels = F.normalize(pixels, list(self.mean), list(self.std))
        padding = [0, 0, self.crop - width, self.crop - height]  # left, top, right, bottom
        if any(padding):
            pixels, mask = F.pad(pixels, padding, fill=0), F.pad(mask, padding, fill=ignore_index)
        return pixels.contiguous(), mask.as_subclass(torch.Tensor).contiguous()

    def _crop_box(self, mask: torch.Tensor, ignore_index: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) from v2's crop parameters; with ``cat_max_ratio`` < 1, the
        first of up to 10 draws where at least two classes share the crop and none dominates (else the
        least dominated draw)."""
        cropper = v2.RandomCrop((min(self.crop, mask.shape[-2]), min(self.crop, mask.shape[-1])))
        best, best_ratio = None, 2.0
        for _ in range(CROP_TRIES if self.cat_max_ratio < 1 else 1):
            p = cropper.make_params([mask])
            box = (p["top"], p["left"], p["height"], p["width"])
            if self.cat_max_ratio >= 1:
                return box
            window = mask[box[0] : box[0] + box[2], box[1] : box[1] + box[3]]
            counts = torch.unique(window[window != ignore_index], return_counts=True)[1]
            ratio = float(counts.max()) / float(counts.sum()) if len(counts) > 1 else 1.0
            if ratio < self.cat_max_ratio:
                return box
            if ratio < best_ratio:
                best, best_ratio = box, ratio
        return best


def _coin() -> bool:
    return bool(torch.rand(()) < 0.5)


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def photometric_distortion(image: torch.Tensor) -> torch.Tensor:
    """mmseg's ``PhotoMetricDistortion`` on a float [0, 1] (3, H, W) image (torch's global RNG)."""
    if _coin():
        image = (image + _uniform(-32, 32) / 255).clamp(0, 1)
    contrast_first = _coin()

    def contrast(x: torch.Tensor) -> torch.Tensor:
        return (x * _uniform(0.5, 1.5)).clamp(0, 1) if _coin() else x

    if contrast_first:
        image = contrast(image)
    if _coin():
        image = F.adjust_saturation(image, _uniform(0.5, 1.5))
    if _coin():
        image = F.adjust_hue(image, _uniform(-18, 18) / 180)
    if not contrast_first:
        image = contrast(image)
    return image


class SegTrainDataset(Dataset):
    """Augmented training samples: ``{"image", "label", "index"}`` dicts that the default collate stacks.

    * ``image``: float32 (3, crop, crop), normalised with the transforms' mean / std;
    * ``label``: int64 (crop, crop): a class index ``0 .. num_classes - 1``, ``background_index``
      (when the dataset supervises a background outside the classes) or ``ignore_index``;
    * ``index``: int64 scalar, the sample's position in :attr:`samples`.

    ``dataset[i]`` uses the global RNG (seeded per DataLoader worker by torch); ``dataset[(i, seed)]``
    derives every random choice from ``seed`` (a non-negative int), so a resumed run replays its crops.

    Args:
        samples: the (image, label) files.
        label_fn: stored label map -> int64 class indices (with ``ignore_index``); must be picklable for
            DataLoader workers (a module-level function, ``functools.partial`` or class instance).
        classes: the supervised classes in index order (names with optional ``;`` synonyms, or a
            :class:`~vocabseg.text.vocabulary.Vocabulary`).
        transforms: the augmentation.
        name: the dataset's name in messages and :meth:`describe`.
        ignore_index: the unsupervised label value.
        background_index: the label value meaning "none of the classes", if any (it may be a class
            index, as VOC21's background, or ``num_classes``, as PASCAL-5i training's).
        notes: facts a training report should state.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        label_fn: Callable[[np.ndarray], np.ndarray],
        classes: Vocabulary | Sequence[str | Sequence[str]],
        transforms: TrainTransforms,
        *,
        name: str = "train",
        ignore_index: int = 255,
        background_index: int | None = None,
        notes: Sequence[str] = (),
    ) -> None:
        self.samples = list(samples)
        self.label_fn = label_fn
        self.vocabulary = classes if isinstance(classes, Vocabulary) else Vocabulary.from_list(classes)
        self.transforms = transforms
        self.name = name
        self.ignore_index = ignore_index
        self.background_index = background_index
        self.notes = list(notes)
        if not self.samples:
            raise DatasetLayoutError(f"{name}: no training samples.")

    @classmethod
    def from_benchmark(cls, dataset: SegDataset, transforms: TrainTransforms) -> SegTrainDataset:
        """Train on a semantic benchmark split (e.g. ``build_dataset("voc21", root, split="train")``)
        with its own label rule and classes."""
        if dataset.kind != "semantic":
            raise DatasetLayoutError(
                f"{dataset.name}: {dataset.kind} datasets have no per-pixel training labels; "
                "for PASCAL-5i use vocabseg.data.pascal5i.build_pascal5i_train."
            )
        return cls(
            dataset.samples,
            _LabelRule(dataset.label_rule, dataset.ignore_index),
            dataset.vocabulary,
            transforms,
            name=dataset.name,
            ignore_index=dataset.ignore_index,
            background_index=dataset.vocabulary.background_index,
            notes=dataset.notes,
        )

    @property
    def class_names(self) -> list[str]:
        return self.vocabulary.class_names

    @property
    def num_classes(self) -> int:
        return len(self.vocabulary)

    def __len__(self) -> int:
        return len(self.samples)

    def read_label(self, sample: Sample) -> np.ndarray:
        """(H, W) int64 training labels of ``sample`` before augmentation; values are checked."""
        labels = np.asarray(self.label_fn(read_label_map(sample.label)), dtype=np.int64)
        valid = (labels == self.ignore_index) | ((labels >= 0) & (labels < self.num_classes))
        if self.background_index is not None:
            valid |= labels == self.background_index
        if not valid.all():
            values = sorted({int(v) for v in np.unique(labels[~valid])[:5]})
            raise DatasetLayoutError(
                f"{self.name}: {sample.label} has label value(s) that map to {values}, neither one of the "
                f"{self.num_classes} classes, the background nor the ignore index {self.ignore_index}; "
                "wrong dataset folder, label format or class list?"
            )
        return labels

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = (key[0], key[1]) if isinstance(key, (tuple, list)) else (key, None)
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} samples")
        index %= len(self)
        sample = self.samples[index]
        image = read_rgb(sample.image)
        labels = self.read_label(sample)
        check_same_size(image, labels, sample, self.name)
        if seed is None:
            pixels, target = self.transforms(image, labels, self.ignore_index)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(int(seed))
                pixels, target = self.transforms(image, labels, self.ignore_index)
        return {"image": pixels, "label": target, "index": torch.tensor(index, dtype=torch.int64)}

    def describe(self) -> dict[str, Any]:
        """The facts of the training data a checkpoint or report must carry."""
        return {
            "dataset": self.name,
            "num_samples": len(self.samples),
            "num_classes": self.num_classes,
            "classes": self.class_names,
            "background_index": self.background_index,
            "ignore_index": self.ignore_index,
            "transforms": asdict(self.transforms),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class _LabelRule:
    """A picklable ``label_fn`` applying a benchmark's label rule."""

    rule: str
    ignore_index: int

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        return apply_label_rule(raw, self.rule, self.ignore_index)
