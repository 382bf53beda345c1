"""Unsupervised masks for any folder of images: k-means of DINO patch features (PixelCLIP's
label-free alternative to SA-1B: DINO ViT-S/16, k = 16 clusters per image).

Per image: ImageNet-normalised pixels, short side resized to ``input_size`` (sides rounded to
multiples of 16, the patch size) -> VFM patch features (h, w, C) -> k-means on the h*w vectors ->
a cluster index per patch -> one mask per cluster at the image's resolution.

Choices the official description leaves open, made here:

* k-means: Euclidean Lloyd iterations (the default mode of ``fast-pytorch-kmeans``, which the
  official code depends on), at most 100 iterations, stopping when the centroids move less than
  ``1e-4`` in total; seeded k-means++ initialisation (D²-weighted sampling, ``torch.Generator``), so
  the masks of an image are the same in every run and process; an empty cluster keeps its centroid.
* upsampling: the one-hot patch assignment is resized bilinearly and argmaxed, which gives smooth
  boundaries at pixel level (nearest would give 16-pixel staircases) and still a partition of the
  image: every pixel is in exactly one mask. Clusters no pixel ends up in give no mask, so an image has
  at most ``k`` masks.

Masks are cached on disk (one safetensors file per image holding the uint8 cluster map), keyed by
the image file's bytes, the VFM's weights fingerprint and every setting above, and written
atomically, so training epochs and DataLoader workers reuse them and a stale entry is never served.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn
from torch.utils.data import Dataset

from ..errors import DatasetLayoutError
from ..io.files import atomic_write
from ..models.fingerprint import weights_fingerprint
from ..models.vfm import IMAGENET_MEAN, IMAGENET_STD, load_vfm
from .files import read_rgb
from .sa1b import resize_image, scaled_size

DINO_VFM = "dino_vits16"  # PixelCLIP's DINO ViT-S/16
DINO_K = 16  # PixelCLIP's clusters per image
PATCH = 16
INPUT_SIZE = 448  # short side the VFM sees (28 patches); a choice, see the module docstring
KMEANS_ITERS = 100
KMEANS_TOL = 1e-4
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_CACHE_VERSION = "dino-masks-v1"  # bump when the computation changes


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """(k, D) initial centroids among the rows of ``x`` (N, D): the first uniformly, each next with
    probability proportional to its squared distance to the nearest chosen one (uniformly once every
    point coincides with a centroid)."""
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = (x - x[chosen[0]]).pow(2).sum(1)
    for _ in range(1, k):
        weights = nearest if float(nearest.sum()) > 0 else torch.ones_like(nearest)
        index = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(index)
        nearest = torch.minimum(nearest, (x - x[index]).pow(2).sum(1))
    return x[chosen].clone()


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, k) exact squared Euclidean distances (no ``|x|² - 2x·c + |c|²`` cancellation)."""
    return (x[:, None, :] - centroids[None, :, :]).pow(2).sum(-1)


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    iters: int = KMEANS_ITERS,
    tol: float = KMEANS_TOL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the rows of ``x`` (N, D) from a seeded k-means++ start.

    Returns int64 labels (N,) and float centroids (k', D), k' = min(k, N); the labels are the nearest
    final centroid of each row. Deterministic for a given ``seed`` (CPU generator).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    x = x.detach().float().cpu()
    k = min(k, x.shape[0])
    generator = torch.Generator().manual_seed(int(seed))
    centroids = kmeans_plus_plus(x, k, generator)
    for _ in range(iters):
        labels = squared_distances(x, centroids).argmin(1)
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        updated = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
        shift = float((updated - centroids).pow(2).sum(1).sqrt().sum())
        centroids = updated
        if shift <= tol:
            break
    return squared_distances(x, centroids).argmin(1), centroids


def upsample_labels(labels: torch.Tensor, size: tuple[int, int], k: int) -> torch.Tensor:
    """(h, w) cluster indices -> (H, W) by bilinear resizing of the one-hot maps, then argmax."""
    one_hot = F.one_hot(labels.long(), k).permute(2, 0, 1)[None].float()
    return F.interpolate(one_hot, size=size, mode="bilinear", align_corners=False)[0].argmax(0)


def vfm_input(image: np.ndarray, input_size: int | None) -> torch.Tensor:
    """(1, 3, h, w) ImageNet-normalised float pixels, short side ``input_size`` (``None``: the image's
    own), both sides rounded to multiples of the patch size (at least one patch)."""
    h, w = image.shape[:2]
    scale = 1.0 if input_size is None else input_size / min(h, w)
    size = [max(PATCH, round(s * scale / PATCH) * PATCH) for s in (h, w)]
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255
    pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (pixels - mean) / std


@torch.no_grad()
def cluster_map(
    vfm: nn.Module,
    image: np.ndarray,
    k: int = DINO_K,
    *,
    input_size: int | None = INPUT_SIZE,
    seed: int = 0,
) -> np.ndarray:
    """(H, W) uint8 cluster index per pixel of the (H, W, 3) uint8 ``image`` (no cache)."""
    if not 1 <= k <= 256:
        raise ValueError(f"k must be in 1..256 (masks are stored as uint8), got {k}")
    device = next(vfm.parameters()).device
    feats = vfm(vfm_input(image, input_size).to(device))[0]  # (C, h, w)
    c, h, w = feats.shape
    labels, _ = kmeans(feats.reshape(c, h * w).T, k, seed=seed)
    full = upsample_labels(labels.reshape(h, w), tuple(image.shape[:2]), k)
    return full.to(torch.uint8).numpy()


def masks_from_map(labels: np.ndarray) -> np.ndarray:
    """bool (N, H, W): one mask per cluster present in the (H, W) map, by increasing index."""
    present = np.unique(labels)
    return labels[None] == present[:, None, None]


class LabelMasks:
    """The masks of a partition (one per label present), sampled on demand like
    :class:`~vocabseg.data.sa1b.RLEMasks`: what :class:`DinoMasks` gives the training data."""

    def __init__(self, labels: np.ndarray):
        self.labels = labels
        self.shape = tuple(labels.shape)
        self.present = np.unique(labels)

    def __len__(self) -> int:
        return len(self.present)

    def sample(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """bool (N, len(rows), len(cols)): each label's mask at the grid ``rows`` x ``cols`` (N: the
        labels present in the whole map, by increasing value; a label the grid misses gives an empty mask)."""
        grid = self.labels[np.asarray(rows)[:, None], np.asarray(cols)[None, :]]
        return grid[None] == self.present[:, None, None]


def _list_images(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def _default_cache_dir() -> Path:
    from ..text.encoder import default_cache_dir  # the one home of the cache location

    return default_cache_dir()


class DinoMasks(Dataset):
    """Any folder of images with unsupervised DINO k-means masks: ``{"image", "masks", "index"}``.

    * ``image``: uint8 (3, H, W), the stored image with its short side at most ``max_short_side``;
    * ``masks``: bool (N, H, W), N <= ``k``, a partition of the image (see the module docstring);
    * ``index``: int64 scalar, the position in :attr:`images`.

    Args:
        root: a folder of images (searched recursively; .jpg, .jpeg, .png, .bmp, .webp).
        vfm: a VFM module (dense (B, C, h, w) features of ImageNet-normalised images) or a
            :data:`~vocabseg.models.vfm.VFM_SPECS` name, loaded with ``vfm_pretrained``.
        k: clusters per image.
        cache_dir: where masks are cached (a ``dino_masks`` folder inside it); ``"default"`` is
            ``$VOCABSEG_CACHE`` (else ``~/.cache/vocabseg``), ``None`` disables the cache.
        input_size: short side of the VFM's input.
        max_short_side: downscale of the returned image and masks (``None``: stored size).
        seed: k-means++ seed.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        vfm: nn.Module | str = DINO_VFM,
        *,
        k: int = DINO_K,
        cache_dir: str | os.PathLike | None = "default",
        input_size: int | None = INPUT_SIZE,
        max_short_side: int | None = None,
        seed: int = 0,
        vfm_pretrained: str | None = "default",
        name: str = "dino_masks",
    ) -> None:
        if not 1 <= k <= 256:
            raise ValueError(f"k must be in 1..256 (masks are stored as uint8), got {k}")
        self.root = Path(root)
        self.vfm = load_vfm(vfm, vfm_pretrained) if isinstance(vfm, str) else vfm
        self.vfm_name = vfm if isinstance(vfm, str) else type(vfm).__name__
        self.k = k
        self.cache_dir = (
            None if cache_dir is None else _default_cache_dir() if cache_dir == "default" else Path(cache_dir)
        )
        self.input_size = input_size
        self.max_short_side = max_short_side
        self.seed = seed
        self.name = name
        if not self.root.is_dir():
            raise DatasetLayoutError(f"{name}: image folder not found: {self.root}")
        self.images = _list_images(self.root)
        if not self.images:
            raise DatasetLayoutError(
                f"{name}: no images ({', '.join(IMAGE_SUFFIXES)}) under {self.root}; point it at a folder of images."
            )

    def __len__(self) -> int:
        return len(self.images)

    def cache_key(self, image_bytes: bytes) -> str:
        """The cache entry of an image: its bytes, the VFM's weights and every setting of the masks."""
        h = hashlib.blake2b(digest_size=20)
        h.update(image_bytes)
        settings = (_CACHE_VERSION, weights_fingerprint(self.vfm), self.k, self.input_size, self.max_short_side)
        h.update(repr((*settings, self.seed, KMEANS_ITERS, KMEANS_TOL, PATCH)).encode())
        return h.hexdigest()

    def cache_path(self, image_bytes: bytes) -> Path | None:
        return (
            None
            if self.cache_dir is None
            else self.cache_dir / "dino_masks" / f"{self.cache_key(image_bytes)}.safetensors"
        )

    def labels(self, index: int, image: np.ndarray | None = None) -> np.ndarray:
        """(H, W) uint8 cluster map of image ``index`` (at the returned image's size), from the cache
        when there, else computed and cached."""
        path = self.images[index]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DatasetLayoutError(f"{path}: unreadable image ({exc})") from None
        cache = self.cache_path(data)
        if cache is not None and cache.is_file():
            try:
                return load_file(cache)["labels"].numpy()
            except (SafetensorError, OSError, KeyError):  # a corrupt entry is recomputed, never trusted
                pass
        if image is None:
            image = self._image(index)
        labels = cluster_map(self.vfm, image, self.k, input_size=self.input_size, seed=self.seed)
        if cache is not None:
            blob = save({"labels": torch.from_numpy(labels)})
            atomic_write(cache, lambda f: f.write(blob))
        return labels

    def _image(self, index: int) -> np.ndarray:
        image = read_rgb(self.images[index])
        return resize_image(image, scaled_size(image.shape[0], image.shape[1], self.max_short_side))

    def load(self, index: int) -> tuple[np.ndarray, LabelMasks]:
        """(image, its masks): what :class:`~vocabseg.data.mask_train.MaskTrainDataset` reads."""
        image = self._image(index)
        labels = self.labels(index, image)
        if labels.shape != image.shape[:2]:  # an entry of another size under the same key: never expected
            raise DatasetLayoutError(f"{self.images[index]}: cached masks are {labels.shape}, image {image.shape[:2]}")
        return image, LabelMasks(labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} images")
        index %= len(self)
        image, masks = self.load(index)
        labels = masks.labels
        return {
            "image": torch.from_numpy(np.array(image)).permute(2, 0, 1),
            "masks": torch.from_numpy(masks_from_map(labels)),
            "index": torch.tensor(index, dtype=torch.int64),
        }

    def build_cache(self) -> int:
        """Compute the masks of every image not cached yet (before training); returns how many."""
        if self.cache_dir is None:
            return 0
        computed = 0
        for index, path in enumerate(self.images):
            cache = self.cache_path(path.read_bytes())
            if cache is not None and not cache.is_file():
                self.labels(index)
                computed += 1
        return computed

    def describe(self) -> dict[str, Any]:
        """The facts of the mask source a training report must carry."""
        return {
            "dataset": self.name,
            "mask_source": "dino_kmeans",
            "vfm": self.vfm_name,
            "k": self.k,
            "input_size": self.input_size,
            "max_short_side": self.max_short_side,
            "seed": self.seed,
            "num_samples": len(self),
        }
