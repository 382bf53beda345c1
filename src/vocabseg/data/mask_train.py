"""Training data from unlabeled masks (PixelCLIP, Shin et al., NeurIPS 2024): one random crop of an
image, seen twice, with the crop's class-free masks.

A sample is ``{"image", "teacher_image", "masks", "index"}`` and :func:`collate_masks` batches them to

* ``image``: float32 (B, 3, S, S), the strongly augmented view the student sees;
* ``teacher_image``: float32 (B, 3, S, S), the weakly augmented view of the same crop (same pixel
  positions: only colours and the cutout differ), for the momentum teacher;
* ``masks``: bool (B, M, R, R), the crop's masks at the mask resolution R, padded with all-False
  masks to the batch's largest M (M <= ``max_masks``); ``mask_valid``: bool (B, M);
* ``index``: int64 (B,).

Both views are normalised (CLIP mean / std) and padded at the bottom / right to S x S with 0 (the
mean colour) when the crop is smaller; the masks cover that same S x S canvas.

The augmentation is the official PixelCLIP mapper's (its SA-1B dataset mapper with the detectron2
augmentations of its ViT-B config):

1. resize: short side to ``base_size * r`` (``base_size`` defaults to the crop), ``r`` uniform in
   ``scale`` (PixelCLIP: 640 x 1.6 = 1024, fixed), unless the long side would exceed ``max_size``
   (1333, detectron2's default), then the long side to ``max_size`` (detectron2
   ``ResizeShortestEdge``); bilinear for the image. ``scale=None`` keeps the stored size;
2. crop: ``crop`` x ``crop`` (640; smaller where the image is), uniform position (the config's
   category-area constraint is 1.0, i.e. off: masks have no categories);
3. colour, weak view: the SSD photometric distortion (``COLOR_AUG_SSD``; the same steps as mmseg's
   :func:`~vocabseg.data.train.photometric_distortion`, reused);
4. horizontal flip with p = 0.5.

The strong view starts from the weak one: colour jitter (brightness, contrast, saturation 0.5, hue
0.25) with p = 0.8, grayscale with p = 0.2, Gaussian blur with sigma uniform in [0.1, 2] with p = 0.5,
then a black cutout whose height and width are each 10-50 % of the crop's, centred so that it fits
inside. The cutout's pixels are removed from every mask (the official mapper does so too, so the
masked pooling and the loss ignore them).

Masks: resized with the image by nearest neighbour at pixel centres (PIL's ``NEAREST``, as detectron2
does), cropped, flipped, then sampled to R x R by torch's legacy nearest (``floor(i * S / R)``), as the
official model does; masks with 1 pixel or fewer at R x R are dropped, then the ``max_masks`` largest
kept, largest first. The pipeline composes these index maps and samples each mask only at the R x R
grid's pixels (:meth:`~vocabseg.data.sa1b.RLEMasks.sample`), which gives the same masks as resizing
whole masks, without ever holding one at the resized size.

Where this differs from the official code:

* crops smaller than S (an image whose resized short side is below S): the official mapper keeps such
  masks at the crop's size and stretches them to R x R while the batch pads the images; here the
  masks cover the padded canvas, so masks and pixels stay aligned;
* the cutout: the official mapper draws its width from the crop's height and vice versa (the same
  for square crops);
* colour: the official code runs the SSD distortion (OpenCV) and the jitter (torchvision on PIL) on
  8-bit images, rounding after each step; here both run on float tensors;
* blur: PIL's ``GaussianBlur(radius=sigma)`` (iterated box blurs) there, a Gaussian kernel of
  ``2 ceil(3 sigma) + 1`` taps here;
* ``MAX_MASKS`` (512) is a setting of the official code that its model never applies;
* the DINO variant: the official model clusters DINO features of each augmented crop on the GPU;
  :class:`~vocabseg.data.dino_masks.DinoMasks` clusters each whole image once (cached) and the crop
  takes the part of that partition it covers.

Exact resume and DDP need the same crops again: ``dataset[(index, seed)]`` draws every random number
of the sample from ``seed`` alone.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..errors import DatasetLayoutError, MethodOptionError
from ..models.clip import OPENAI_MEAN, OPENAI_STD
from .sa1b import MAX_MASKS, MIN_MASK_PIXELS, SA1B_SHORT_SIDE, nearest_index
from .train import TrainTransforms, photometric_distortion

SCALE = (1.6, 1.6)  # PixelCLIP INPUT.MIN_SIZE_TRAIN 1024 = 1.6 x its 640 crop
MAX_SIZE = 1333  # detectron2's INPUT.MAX_SIZE_TRAIN default, which PixelCLIP's config keeps
CROP = 640  # PixelCLIP INPUT.CROP.SIZE
MASK_RESOLUTION = 256  # PixelCLIP MODEL.MASK_RESOLUTION
JITTER = (0.5, 0.5, 0.5, 0.25)  # brightness, contrast, saturation, hue of the strong view
JITTER_P, GRAY_P, BLUR_P = 0.8, 0.2, 0.5
BLUR_SIGMA = (0.1, 2.0)
CUTOUT_FRACTION = (0.1, 0.5)  # of each side of the crop


class MaskSet(Protocol):
    """The masks of one image at their stored size, sampled on demand (``RLEMasks``, ``LabelMasks``)."""

    shape: tuple[int, ...]

    def __len__(self) -> int: ...

    def sample(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray: ...


class MaskSource(Protocol):
    """Images with class-free masks (``SA1BMasks``, ``DinoMasks``)."""

    name: str

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[np.ndarray, MaskSet]: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class CropGeometry:
    """One draw of the geometric augmentation: the resized size, the crop box in it, the flip."""

    height: int
    width: int
    top: int
    left: int
    crop_height: int
    crop_width: int
    flip: bool


def resized_shape(height: int, width: int, short: float, max_size: int) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge``: the short side to ``short``, unless the long side would
    exceed ``max_size``, then the long side to ``max_size``; rounded half up."""
    scale = short / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def _randint(low: int, high: int) -> int:
    """Uniform in ``low .. high`` inclusive."""
    return int(torch.randint(low, high + 1, ()))


def _cutout_span(size: int, extent: int) -> tuple[int, int]:
    """[start, stop) of a cutout of ``size`` pixels on an axis of ``extent``, its centre drawn so the
    cutout fits inside (the official mapper's ``cutout_inside``; clipped to the axis)."""
    half = size // 2
    low, high = sorted((half, extent + (1 - size % 2) - half))
    start = _randint(low, high) - half
    return max(0, start), min(extent, start + size)


def gaussian_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` of a (C, h, w) float image with a ``2 ceil(3 sigma) + 1``-tap
    kernel (reflect padding), run as two 1-D passes of shifted sums: the same result, ~10x faster on
    a CPU than its 2-D depthwise convolution."""
    radius = min(math.ceil(3 * sigma), pixels.shape[-2] - 1, pixels.shape[-1] - 1)
    if radius < 1:
        return pixels
    x = torch.linspace(-radius, radius, 2 * radius + 1, dtype=torch.float64)
    weights = torch.softmax(-0.5 * (x / sigma) ** 2, 0).tolist()  # exp(.) / sum(exp(.))
    padded = torch.nn.functional.pad(pixels[None], (radius,) * 4, mode="reflect")[0]
    h, w = pixels.shape[-2:]
    rows = padded[..., :w] * weights[0]
    for i, weight in enumerate(weights[1:], 1):
        rows.add_(padded[..., i : i + w], alpha=weight)
    out = rows[..., :h, :] * weights[0]
    for i, weight in enumerate(weights[1:], 1):
        out.add_(rows[..., i : i + h, :], alpha=weight)
    return out


def strong_view(pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The student's augmentation of a float [0, 1] (3, h, w) view (torch's global RNG): colour
    jitter, grayscale, blur, then the cutout. Returns the view and the cutout (top, bottom, left, right)."""
    if torch.rand(()) < JITTER_P:
        pixels = v2.ColorJitter(*JITTER)(pixels)
    pixels = v2.RandomGrayscale(GRAY_P)(pixels)
    if torch.rand(()) < BLUR_P:
        pixels = gaussian_blur(pixels, _uniform(*BLUR_SIGMA))
    h, w = pixels.shape[-2:]
    cut_h, cut_w = int(h * _uniform(*CUTOUT_FRACTION)), int(w * _uniform(*CUTOUT_FRACTION))
    (y0, y1), (x0, x1) = _cutout_span(cut_h, h), _cutout_span(cut_w, w)
    pixels = pixels.clone()
    pixels[:, y0:y1, x0:x1] = 0
    return pixels, (y0, y1, x0, x1)


@dataclass(frozen=True)
class MaskTrainTransforms:
    """The two-view augmentation and mask sampling (see the module docstring for each step).

    Attributes:
        crop: S, the square output size.
        scale: range of the resize factor ``r``: the short side becomes ``base_size * r`` (a fixed
            1.6 for PixelCLIP); ``None`` keeps the stored size.
        base_size: the short side at ``r = 1`` (default: ``crop``).
        max_size: cap on the resized long side.
        flip: random horizontal flip.
        photometric: the SSD colour distortion of both views.
        strong: the student's strong augmentation; off, the student sees the teacher's view.
        mask_resolution: R.
        max_masks: most masks per sample (the largest kept).
        mean, std: normalisation of the [0, 1] RGB views.
    """

    crop: int = CROP
    scale: tuple[float, float] | None = SCALE
    base_size: int | None = None
    max_size: int = MAX_SIZE
    flip: bool = True
    photometric: bool = True
    strong: bool = True
    mask_resolution: int = MASK_RESOLUTION
    max_masks: int = MAX_MASKS
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __post_init__(self) -> None:
        for name in ("crop", "max_size", "mask_resolution", "max_masks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MethodOptionError(f"{name} must be a positive integer, got {value!r}.")
        if self.base_size is not None and (not isinstance(self.base_size, int) or self.base_size < 1):
            raise MethodOptionError(f"base_size must be a positive integer or None, got {self.base_size!r}.")
        if self.scale is not None and not 0 < self.scale[0] <= self.scale[1]:
            raise MethodOptionError(f"scale must be a range 0 < low <= high, got {self.scale}.")

    @classmethod
    def from_train_transforms(cls, transforms: TrainTransforms, **options: Any) -> MaskTrainTransforms:
        """The recipe's data settings (``build_training`` passes them as a ``TrainTransforms``): crop,
        scale, base_size, flip, photometric, mean / std, all meaning what they mean there;
        ``options`` set the rest."""
        if transforms.cat_max_ratio < 1:
            raise MethodOptionError(
                f"data.cat_max_ratio={transforms.cat_max_ratio} limits the crop's largest class, but unlabeled "
                "masks have no classes: set data.cat_max_ratio=1.0."
            )
        return cls(
            crop=transforms.crop,
            scale=None if transforms.scale is None else tuple(transforms.scale),
            base_size=transforms.base_size,
            flip=transforms.flip,
            photometric=transforms.photometric,
            mean=tuple(transforms.mean),
            std=tuple(transforms.std),
            **options,
        )

    def draw_geometry(self, height: int, width: int) -> CropGeometry:
        """Resize, crop and flip of an image of ``height`` x ``width`` (torch's global RNG)."""
        if self.scale is None:
            new_h, new_w = height, width
        else:
            short = (self.base_size or self.crop) * _uniform(*self.scale)
            new_h, new_w = resized_shape(height, width, short, self.max_size)
        crop_h, crop_w = min(self.crop, new_h), min(self.crop, new_w)
        top, left = _randint(0, new_h - crop_h), _randint(0, new_w - crop_w)
        flip = bool(torch.rand(()) < 0.5) if self.flip else False
        return CropGeometry(new_h, new_w, top, left, crop_h, crop_w, flip)

    def crop_image(self, image: np.ndarray, g: CropGeometry) -> torch.Tensor:
        """float [0, 1] (3, crop_height, crop_width): the crop of the resized, flipped image. PIL
        resizes the crop's box of the source directly, which equals resizing the whole image and then
        cropping up to rounding (at most 1/255 on a few pixels) at a third of the cost."""
        h, w = image.shape[:2]
        sy, sx = h / g.height, w / g.width
        box = (g.left * sx, g.top * sy, (g.left + g.crop_width) * sx, (g.top + g.crop_height) * sy)
        crop = np.asarray(Image.fromarray(image).resize((g.crop_width, g.crop_height), Image.BILINEAR, box=box))
        pixels = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255
        return pixels.flip(-1) if g.flip else pixels

    def mask_grid(
        self, g: CropGeometry, image_shape: tuple[int, int], mask_shape: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Stored-mask rows and columns of the R x R grid's points inside the crop (the first ones of
        each axis; the rest fall in the padding), composing: R-grid -> S canvas (legacy nearest) ->
        flip -> crop offset -> resized image -> image (PIL nearest) -> stored mask (PIL nearest)."""
        canvas = np.arange(self.mask_resolution) * self.crop // self.mask_resolution
        y = canvas[canvas < g.crop_height] + g.top
        x = canvas[canvas < g.crop_width]
        x = (g.crop_width - 1 - x if g.flip else x) + g.left
        (ih, iw), (mh, mw) = image_shape, mask_shape
        rows = nearest_index(nearest_index(y, ih, g.height), mh, ih)
        cols = nearest_index(nearest_index(x, iw, g.width), mw, iw)
        return rows, cols

    def __call__(self, image: np.ndarray, masks: MaskSet) -> dict[str, torch.Tensor]:
        """(H, W, 3) uint8 image and its masks -> one sample (torch's global RNG)."""
        g = self.draw_geometry(*image.shape[:2])
        weak = self.crop_image(image, g)
        if self.photometric:
            weak = photometric_distortion(weak)
        strong, cut = strong_view(weak) if self.strong else (weak, (0, 0, 0, 0))
        rows, cols = self.mask_grid(g, image.shape[:2], masks.shape[:2])
        r = self.mask_resolution
        grid = np.zeros((len(masks), r, r), dtype=bool)
        grid[:, : len(rows), : len(cols)] = masks.sample(rows, cols)
        canvas = np.arange(r) * self.crop // r
        in_rows = (canvas >= cut[0]) & (canvas < cut[1])
        in_cols = (canvas >= cut[2]) & (canvas < cut[3])
        grid[:, in_rows[:, None] & in_cols[None, :]] = False
        area = grid.sum((1, 2))
        keep = np.flatnonzero(area >= MIN_MASK_PIXELS)
        keep = keep[np.argsort(-area[keep], kind="stable")][: self.max_masks]
        return {
            "image": self._finish(strong),
            "teacher_image": self._finish(weak),
            "masks": torch.from_numpy(np.ascontiguousarray(grid[keep])),
        }

    def _finish(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalise, then pad to S x S at the bottom / right with 0 (the mean colour)."""
        pixels = F.normalize(pixels, list(self.mean), list(self.std))
        pad_h, pad_w = self.crop - pixels.shape[-2], self.crop - pixels.shape[-1]
        if pad_h or pad_w:
            pixels = torch.nn.functional.pad(pixels, (0, pad_w, 0, pad_h))
        return pixels.contiguous()


def collate_masks(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the views; pad every sample's masks with all-False ones to the batch's largest count M
    (possibly 0), with ``mask_valid`` marking the real ones."""
    count = max(s["masks"].shape[0] for s in samples)
    res = samples[0]["masks"].shape[-2:]
    masks = torch.zeros((len(samples), count, *res), dtype=torch.bool)
    valid = torch.zeros((len(samples), count), dtype=torch.bool)
    for b, s in enumerate(samples):
        n = s["masks"].shape[0]
        masks[b, :n] = s["masks"]
        valid[b, :n] = True
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "teacher_image": torch.stack([s["teacher_image"] for s in samples]),
        "masks": masks,
        "mask_valid": valid,
        "index": torch.stack([s["index"] for s in samples]),
    }


class MaskTrainDataset(Dataset):
    """Augmented two-view samples of a :class:`MaskSource` (see the module docstring for the format).

    ``dataset[i]`` uses the global RNG; ``dataset[(i, seed)]`` derives every random choice from
    ``seed`` (a non-negative int), so a resumed or distributed run sees the same crops. The loader
    batches with :attr:`collate_fn` (:func:`collate_masks`).
    """

    collate_fn = staticmethod(collate_masks)

    def __init__(self, source: MaskSource, transforms: MaskTrainTransforms, *, name: str | None = None) -> None:
        self.source = source
        self.transforms = transforms
        self.name = name or getattr(source, "name", "masks")
        self.notes = list(getattr(source, "notes", []))
        if len(source) == 0:
            raise DatasetLayoutError(f"{self.name}: no training images.")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = (key[0], key[1]) if isinstance(key, (tuple, list)) else (key, None)
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} images")
        index %= len(self)
        image, masks = self.source.load(index)
        if seed is None:
            sample = self.transforms(image, masks)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(int(seed))
                sample = self.transforms(image, masks)
        return {**sample, "index": torch.tensor(index, dtype=torch.int64)}

    def describe(self) -> dict[str, Any]:
        """The facts of the training data a checkpoint or report must carry."""
        return {**self.source.describe(), "transforms": asdict(self.transforms), "notes": list(self.notes)}


# -- the training-data registry's builders (``vocabseg.train.tasks.TRAIN_DATA``) ---------------------------


def build_sa1b_train(
    data_root: str | os.PathLike,
    transforms: TrainTransforms,
    *,
    subset_file: str | None = None,
    image_short_side: int | None = SA1B_SHORT_SIDE,
    max_size: int = MAX_SIZE,
    mask_resolution: int = MASK_RESOLUTION,
    max_masks: int = MAX_MASKS,
    val_dataset: str | None = None,
    val_root: str | None = None,
) -> MaskTrainDataset:
    """SA-1B under ``data_root`` (see :class:`~vocabseg.data.sa1b.SA1BMasks`): ``subset_file`` is a list
    of image ids or tar folder names, or ``"pixelclip"`` for PixelCLIP's 100 tar files; images larger
    than ``image_short_side`` are downscaled first (PixelCLIP's halving; ``None``: as stored).
    ``val_dataset`` / ``val_root`` are read by :func:`build_mask_validation`."""
    from .sa1b import SA1BMasks

    source = SA1BMasks(data_root, subset=subset_file, max_short_side=image_short_side, max_masks=max_masks)
    options = {"max_size": max_size, "mask_resolution": mask_resolution, "max_masks": max_masks}
    return MaskTrainDataset(source, MaskTrainTransforms.from_train_transforms(transforms, **options))


def build_dino_masks_train(
    data_root: str | os.PathLike,
    transforms: TrainTransforms,
    *,
    vfm: str = "dino_vits16",
    dino_weights: str | None = "default",
    k: int = 16,
    input_size: int | None = 448,
    cache_dir: str | None = "default",
    image_short_side: int | None = None,
    max_size: int = MAX_SIZE,
    mask_resolution: int = MASK_RESOLUTION,
    max_masks: int = MAX_MASKS,
    val_dataset: str | None = None,
    val_root: str | None = None,
) -> MaskTrainDataset:
    """Any image folder under ``data_root`` with DINO k-means masks (see
    :class:`~vocabseg.data.dino_masks.DinoMasks`): ``dino_weights`` is ``"default"`` (the timm hub
    weights), a local checkpoint file, or ``None`` (random weights: tests only). ``val_dataset`` /
    ``val_root`` are read by :func:`build_mask_validation`."""
    from .dino_masks import DinoMasks

    source = DinoMasks(
        data_root,
        vfm,
        k=k,
        cache_dir=cache_dir,
        input_size=input_size,
        max_short_side=image_short_side,
        vfm_pretrained=dino_weights,
    )
    options = {"max_size": max_size, "mask_resolution": mask_resolution, "max_masks": max_masks}
    return MaskTrainDataset(source, MaskTrainTransforms.from_train_transforms(transforms, **options))


def build_mask_validation(*, val_dataset: str | None = None, val_root: str | None = None) -> Any:
    """The optional validation benchmark of a mask-trained recipe: ``val_dataset`` (a benchmark name,
    e.g. ``"ade150"``, PixelCLIP's) under ``val_root`` (mask data has no classes to validate on)."""
    if val_dataset is None or val_root is None:
        raise MethodOptionError(
            "Validation of a recipe trained on unlabeled masks needs a benchmark: set data.options.val_dataset "
            "(e.g. 'ade150') and data.options.val_root (its folder), or val_every=null."
        )
    from . import build_dataset

    return build_dataset(val_dataset, val_root)


def sa1b_train(config: Any, data_root: str | os.PathLike, transforms: TrainTransforms) -> MaskTrainDataset:
    """``TRAIN_DATA["sa1b"]``: :func:`build_sa1b_train` with the recipe's ``data.options``."""
    return build_sa1b_train(data_root, transforms, **dict(config.options))


def dino_masks_train(config: Any, data_root: str | os.PathLike, transforms: TrainTransforms) -> MaskTrainDataset:
    """``TRAIN_DATA["dino_masks"]``: :func:`build_dino_masks_train` with the recipe's ``data.options``."""
    return build_dino_masks_train(data_root, transforms, **dict(config.options))


def mask_validation(config: Any, data_root: str | os.PathLike) -> Any:
    """The registry's validation of both: :func:`build_mask_validation` with the recipe's options."""
    return build_mask_validation(val_dataset=config.options.get("val_dataset"), val_root=config.options.get("val_root"))


def option_names(builder: Callable[..., Any]) -> tuple[str, ...]:
    """The keyword-only options of a builder: the ``DataConfig.options`` keys its registry entry reads."""
    return tuple(
        name for name, p in inspect.signature(builder).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    )
