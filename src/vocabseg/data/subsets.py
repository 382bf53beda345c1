"""Named class subsets a benchmark can be scored on (``vocabseg eval --classes-subset NAME``).

Some papers report a benchmark on a few of its classes only. The image is still segmented with the
benchmark's whole vocabulary and every labelled pixel still counts in the confusion matrix (a pixel of
another class predicted as one of the subset's is that class's false positive), but the headline
metrics are over the subset: mIoU and mAcc over its classes, and the pixel accuracy (aAcc) over the
pixels labelled with one of them (:func:`vocabseg.eval.metrics.segmentation_metrics` with ``classes``).

``vilseg-unseen``: the unseen classes of the zero-shot segmentation splits (SPNet, Xian et al. CVPR 2019;
ZS3Net, Bucher et al. NeurIPS 2019; CaGNet, Gu et al. ACM MM 2020) on which ViL-Seg (Liu et al., ECCV 2022,
Sec. 4.1) reports unseen-class mIoU and pixel accuracy: 5 of VOC's 20 object classes, 4 of
PASCAL-Context's 59 and 15 of COCO-Stuff's. ViL-Seg does not say which vocabulary it segments with; the
numbers it compares with (SPNet 15.63, ZS3Net 17.65 mIoU on VOC) are those of CaGNet's generalised
zero-shot table, where every class is predicted and the unseen ones are scored, which is what this does.
Names are the benchmarks' own class names (COCO-Stuff's ``wall-concrete`` and ``playingfield`` are
``concrete wall`` and ``playing field`` here).
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

from .._names import lookup
from ..errors import DatasetLayoutError
from .dataset import SegDataset

__all__ = ["CLASS_SUBSETS", "ClassSubset", "apply_class_subset"]


class ClassSubset(NamedTuple):
    description: str
    classes: dict[str, tuple[str, ...]]  # benchmark -> class names (each a class's first name)


CLASS_SUBSETS: dict[str, ClassSubset] = {
    "vilseg-unseen": ClassSubset(
        "the unseen classes of the SPNet / ZS3Net zero-shot splits, as ViL-Seg (ECCV 2022) scores them",
        {
            "voc20": ("potted plant", "sheep", "sofa", "train", "tv monitor"),
            "context59": ("cow", "motorbike", "sofa", "cat"),
            "coco_stuff": (
                "frisbee",
                "skateboard",
                "cardboard",
                "carrot",
                "scissors",
                "suitcase",
                "giraffe",
                "cow",
                "road",
                "concrete wall",
                "tree",
                "grass",
                "river",
                "clouds",
                "playing field",
            ),
        },
    ),
}


def apply_class_subset(dataset: SegDataset, subset: str) -> SegDataset:
    """``dataset`` scored on the classes of ``subset`` (named ``<benchmark>-<subset>`` in results; the
    benchmark's own published settings still apply). Refuses a subset without classes for this
    benchmark, or a class name the benchmark does not have."""
    spec = lookup(CLASS_SUBSETS, subset, "class subset")
    names = spec.classes.get(dataset.name)
    if names is None:
        raise DatasetLayoutError(
            f"Class subset {subset!r} has no classes for {dataset.name}; it covers {', '.join(spec.classes)}."
        )
    first = {c.names[0].lower(): i for i, c in enumerate(dataset.vocabulary.classes)}
    missing = [n for n in names if n.lower() not in first]
    if missing:
        raise DatasetLayoutError(
            f"Class subset {subset!r}: {dataset.name} has no class named {', '.join(map(repr, missing))} "
            "(was its class file replaced?)."
        )
    indices = tuple(first[n.lower()] for n in names)
    note = (
        f"scored on class subset {subset} ({len(indices)} of {dataset.num_classes} classes: {', '.join(names)}): "
        "every class is predicted; mIoU and mAcc are over these classes, aAcc over their pixels"
    )
    return replace(
        dataset,
        name=f"{dataset.name}-{subset}",
        settings_key=dataset.settings_key,
        scored_classes=indices,
        notes=[*dataset.notes, note],
    )
