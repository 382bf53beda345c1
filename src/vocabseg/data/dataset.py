"""A benchmark split on disk: its samples, vocabulary and label handling.

Label handling (mmseg ``LoadAnnotations``):

* ``none``: labels are used as stored; ``ignore_index`` pixels are not scored.
* ``reduce_zero_label``: label 0 becomes ``ignore_index`` and every other label is shifted down by
  one (``ignore_index`` stays), so 0 = the first real class. VOC20, PASCAL-Context-59 and ADE-150
  drop their background / "other" class this way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .._names import lookup
from ..errors import DatasetLayoutError
from ..text.vocabulary import Vocabulary
from .files import read_label_map, read_rgb
from .layouts import Sample
from .palettes import get_palette


def _reduce_zero_label(raw: np.ndarray, ignore_index: int) -> np.ndarray:
    out = raw - 1
    out[(raw == 0) | (raw == ignore_index)] = ignore_index
    return out


class LabelRule(NamedTuple):
    apply: Callable[[np.ndarray, int], np.ndarray]  # (stored labels, ignore index) -> class indices
    text: str  # how reports describe it


LABEL_RULES: dict[str, LabelRule] = {
    "none": LabelRule(lambda raw, ignore_index: raw, "labels as stored"),
    "reduce_zero_label": LabelRule(_reduce_zero_label, "reduce_zero_label (0 -> ignored, others - 1)"),
}


def apply_label_rule(raw: np.ndarray, rule: str, ignore_index: int) -> np.ndarray:
    """Stored label values -> class indices (``ignore_index`` where not scored)."""
    return lookup(LABEL_RULES, rule, "label rule").apply(raw.astype(np.int64), ignore_index)


@dataclass
class SegDataset:
    """A semantic-segmentation benchmark split.

    Attributes:
        name: benchmark name (``voc21``...).
        root: the dataset root the samples were found in.
        samples: the split, sorted by id.
        vocabulary: the Segmenter vocabulary; class index = label index after the label rule.
        ignore_index: the label value that is not scored (255; 65535 for the detectron2 TIFFs).
        label_rule: a key of :data:`LABEL_RULES`.
        palette: a palette name for saved predictions.
        settings_key: whose published protocol settings apply (the benchmark's own name by default).
        kind: ``semantic`` (one confusion matrix) or ``episodes`` (PASCAL-5i, binary per class).
        notes: facts a report should state (a non-standard image count, derived episode lists...).
        scored_classes: score the headline metrics on these class indices only (every class is still
            predicted; see :mod:`vocabseg.data.subsets`); ``None``: all classes.
    """

    name: str
    root: Path
    samples: list[Sample]
    vocabulary: Vocabulary
    ignore_index: int = 255
    label_rule: str = "none"
    palette: str = "generic"
    settings_key: str = ""
    kind: str = "semantic"
    description: str = ""
    notes: list[str] = field(default_factory=list)
    scored_classes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.settings_key = self.settings_key or self.name

    @property
    def num_classes(self) -> int:
        return len(self.vocabulary)

    @property
    def class_names(self) -> list[str]:
        return self.vocabulary.class_names

    @property
    def has_background(self) -> bool:
        return self.vocabulary.background_index is not None

    def vocabulary_for(self, sample: Sample) -> Vocabulary:
        """The vocabulary an image is segmented with (per episode class for PASCAL-5i)."""
        return self.vocabulary

    def read_image(self, sample: Sample) -> np.ndarray:
        return read_rgb(sample.image)

    def read_label(self, sample: Sample) -> np.ndarray:
        """(H, W) int64 class indices, ``ignore_index`` where not scored; values are checked."""
        labels = apply_label_rule(read_label_map(sample.label), self.label_rule, self.ignore_index)
        check_labels(labels, self.num_classes, self.ignore_index, sample.label, self.name)
        return labels

    def palette_colors(self) -> np.ndarray:
        return get_palette(self.palette, self.num_classes)

    def limited(self, limit: int | None) -> list[Sample]:
        """The first ``limit`` samples of the sorted split (all for ``None``)."""
        return self.samples if limit is None else self.samples[: max(limit, 0)]

    def describe(self) -> dict[str, Any]:
        """The facts of the split a result must carry."""
        return {
            "benchmark": self.name,
            "description": self.description,
            "root": str(self.root),
            "kind": self.kind,
            "num_samples": len(self.samples),
            "num_classes": self.num_classes,
            "classes": self.class_names,
            "background_index": self.vocabulary.background_index,
            "ignore_index": self.ignore_index,
            "label_handling": LABEL_RULES[self.label_rule].text,
            "notes": list(self.notes),
            **({"scored_classes": list(self.scored_classes)} if self.scored_classes is not None else {}),
        }

    def identity(self) -> dict[str, Any]:
        """What determines the per-image results (hashed into the run id)."""
        return {
            "benchmark": self.name,
            "kind": self.kind,
            "ignore_index": self.ignore_index,
            "label_rule": self.label_rule,
            "classes": [list(c.names) for c in self.vocabulary.classes],
            "background_index": self.vocabulary.background_index,
            **({"scored_classes": list(self.scored_classes)} if self.scored_classes is not None else {}),
        }


def check_labels(labels: np.ndarray, num_classes: int, ignore_index: int, path: Path | str, name: str) -> None:
    """Refuse label values that are neither a class index nor the ignore index."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        values = sorted({int(v) for v in np.unique(labels[bad])[:5]})
        raise DatasetLayoutError(
            f"{name}: {path} has label value(s) {values} outside the {num_classes} classes (0..{num_classes - 1}) "
            f"and not the ignore index {ignore_index}; wrong dataset folder, label format or class list?"
        )


def check_same_size(image: np.ndarray, labels: np.ndarray, sample: Sample, name: str) -> None:
    if image.shape[:2] != labels.shape:
        raise DatasetLayoutError(
            f"{name}: image {sample.image} is {image.shape[1]}x{image.shape[0]} but its label {sample.label} is "
            f"{labels.shape[1]}x{labels.shape[0]}; predictions are scored at the label's resolution."
        )


def count_note(found: int, expected: int | None, split: str) -> list[str]:
    """A note when the split does not have its standard number of images."""
    if expected is None or found == expected:
        return []
    return [f"found {found} images; the standard {split} has {expected}"]
