"""The outcome of segmenting one image, and how it is written to disk."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .io.files import atomic_write
from .io.visualize import class_colors, label_image, overlay


@dataclass
class SegmentationResult:
    """Attributes:
    labels: (H, W) int32 class indices at the input image's size, indexing ``classes``.
    classes: display names (first name of each class; ``background`` if one was used).
    probs: (C, H, W) float32 class probabilities (softmax over all names, synonyms max-merged;
        0 for a background class that has no text names and is reached only by thresholding), or
        ``None`` when segmented with ``return_probs=False``.
    image: (H, W, 3) uint8 RGB input, as segmented (after EXIF rotation).
    synonyms: every name of each class.
    background_index: index of the background class in ``classes``, if any.
    info: how the result was made (method, model, settings), written into ``result.json``.
    scores: (H, W) float32 probability of each pixel's label class, given when ``probs`` is not
        kept; otherwise read from ``probs`` (see :attr:`label_scores`).
    """

    labels: np.ndarray
    classes: list[str]
    probs: np.ndarray | None
    image: np.ndarray
    synonyms: list[list[str]] = field(default_factory=list)
    background_index: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.probs is None and self.scores is None:
            raise ValueError("A SegmentationResult needs its class probabilities (probs) or its label scores (scores).")

    @property
    def label_scores(self) -> np.ndarray:
        """(H, W) float32: each pixel's probability of the class it is labelled with."""
        if self.scores is not None:
            return self.scores
        return np.take_along_axis(self.probs, self.labels[None].astype(np.intp), axis=0)[0]

    @property
    def colors(self) -> np.ndarray:
        return class_colors(len(self.classes), self.background_index)

    def class_stats(self) -> list[dict[str, Any]]:
        """Per class: pixel count, area fraction and the mean probability over its pixels (``None`` if
        not finite)."""
        counts = np.bincount(self.labels.reshape(-1), minlength=len(self.classes))
        scores = self.label_scores
        stats = []
        for i, name in enumerate(self.classes):
            mask = self.labels == i
            stats.append(
                {
                    "index": i,
                    "name": name,
                    "names": self.synonyms[i] if i < len(self.synonyms) else [name],
                    "color": [int(c) for c in self.colors[i]],
                    "pixels": int(counts[i]),
                    "area": float(counts[i] / self.labels.size),
                    "mean_score": _finite(float(scores[mask].mean())) if counts[i] else 0.0,
                }
            )
        return stats

    def mask_image(self) -> Image.Image:
        return label_image(self.labels, self.colors)

    def overlay_image(self, alpha: float = 0.5, legend: bool = True) -> Image.Image:
        return overlay(self.image, self.labels, self.colors, self.classes, alpha=alpha, legend=legend)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values only: a NaN or infinite number (a diverged score, an infinite setting)
        becomes ``null``, so strict parsers and ``json.dumps(allow_nan=False)`` accept it."""
        return _json_safe(
            {
                "height": int(self.labels.shape[0]),
                "width": int(self.labels.shape[1]),
                "classes": self.class_stats(),
                "background_index": self.background_index,
                **self.info,
            }
        )

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``mask.png`` (palette PNG of labels), ``overlay.png`` and ``result.json``.

        Each file is written to a temporary name and renamed, so an interrupted run never leaves a
        half-written file behind.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"mask": out / "mask.png", "overlay": out / "overlay.png", "json": out / "result.json"}
        atomic_write(paths["mask"], lambda f: self.mask_image().save(f, format="PNG"))
        atomic_write(paths["overlay"], lambda f: self.overlay_image().save(f, format="PNG"))
        text = json.dumps(self.to_json(), indent=2, allow_nan=False).encode()
        atomic_write(paths["json"], lambda f: f.write(text))
        return paths


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _json_safe(value: Any) -> Any:
    """``value`` with numpy scalars made Python numbers and non-finite floats made ``None``."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return _finite(value)
    return value
