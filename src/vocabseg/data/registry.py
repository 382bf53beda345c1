"""The benchmark table: every fact about a dataset (layout, classes, labels, palette, split size)
in one entry, and :func:`build_dataset` to open one by name.

Facts: the mmseg dataset configs of the SCLIP lineage (Wang et al., ECCV 2024), CAT-Seg's prepared
PC-459 / A-847 and its PAS-20b vocabulary (Cho et al., CVPR 2024) and the HSNet PASCAL-5i lists (Min et
al., ICCV 2021).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .._names import lookup
from .classes import ClassSource
from .dataset import SegDataset, count_note
from .layouts import Layout
from .subsets import apply_class_subset

#: The 8 training-free benchmarks, in the order of the papers' tables.
STANDARD_BENCHMARKS = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade150")
#: The benchmarks of CAT-Seg's table (and of the trained open-vocabulary methods after it), in its
#: order: A-847, PC-459, A-150, PC-59, PAS-20, PAS-20b.
CATSEG_BENCHMARKS = ("ade847", "context459", "ade150", "context59", "voc20", "voc20b")


@dataclass(frozen=True)
class DatasetSpec:
    """Attributes:
    name, description: the benchmark.
    layout: where its files are.
    classes: where its class names come from.
    label_rule, ignore_index: label handling (see :mod:`vocabseg.data.dataset`).
    palette: colours of saved predictions.
    num_images: the standard split size (a different count is reported, not refused).
    settings_key: whose published protocol settings apply (default: its own name).
    classes_in_root: a class file the dataset itself ships (PASCAL-Context's ``labels.txt``).
    build: the factory (semantic datasets, PASCAL-5i episodes).
    """

    name: str
    description: str
    layout: Layout
    classes: ClassSource
    label_rule: str = "none"
    ignore_index: int = 255
    palette: str = "generic"
    num_images: int | None = None
    settings_key: str = ""
    classes_in_root: str | None = None
    build: Callable[..., SegDataset] | None = None


def _build_semantic(
    spec: DatasetSpec,
    data_root: str | os.PathLike,
    classes_file: str | os.PathLike | None = None,
    classes_subset: str | None = None,
) -> SegDataset:
    """A semantic benchmark; ``classes_subset`` scores it on a named class subset (:mod:`.subsets`)."""
    root = spec.layout.find_root(data_root, spec.name)
    if classes_file is None and spec.classes_in_root and (root / spec.classes_in_root).is_file():
        classes_file = root / spec.classes_in_root
    vocabulary = spec.classes.vocabulary(classes_file, benchmark=spec.name)
    samples = spec.layout.samples(root, spec.name)
    notes = count_note(len(samples), spec.num_images, f"{spec.name} split")
    if classes_file is not None:
        notes.append(f"class names from {classes_file}")
    dataset = SegDataset(
        name=spec.name,
        root=root,
        samples=samples,
        vocabulary=vocabulary,
        ignore_index=spec.ignore_index,
        label_rule=spec.label_rule,
        palette=spec.palette,
        settings_key=spec.settings_key,
        description=spec.description,
        notes=notes,
    )
    return dataset if classes_subset is None else apply_class_subset(dataset, classes_subset)


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in DATASETS:
        raise ValueError(f"Dataset {spec.name!r} is already registered.")
    DATASETS[spec.name] = spec
    return spec


def get_dataset_spec(name: str) -> DatasetSpec:
    return lookup(DATASETS, name, "benchmark")


def dataset_options(name: str) -> list[str]:
    """The keyword options :func:`build_dataset` accepts for benchmark ``name``."""
    spec = get_dataset_spec(name)
    params = inspect.signature(spec.build or _build_semantic).parameters
    return [n for n, p in params.items() if n not in ("spec", "data_root") and p.kind != p.KEYWORD_ONLY]


def build_dataset(name: str, data_root: str | os.PathLike, *, split: str | None = None, **options: Any) -> SegDataset:
    """Open benchmark ``name`` under ``data_root`` (the dataset folder itself, or a parent holding
    the standard folder names such as ``VOCdevkit/VOC2012``). Options: ``classes_file`` (every
    benchmark), ``fold``-specific ``episodes`` / ``pairs_file`` (PASCAL-5i).

    ``split`` reads another split the benchmark ships a list for (``"train"`` for VOC and
    PASCAL-Context); the default is the evaluation split the published numbers use.
    """
    spec = get_dataset_spec(name)
    if split is not None and split != spec.layout.split:
        layout = spec.layout.for_split(split, name)
        description = f"{spec.description} [{split} split: {layout.split_file}]"
        spec = replace(spec, layout=layout, num_images=None, description=description)
    return (spec.build or _build_semantic)(spec, Path(data_root), **options)


# -- layouts ------------------------------------------------------------------------------------------
VOC = Layout(
    "PASCAL VOC 2012", ("VOCdevkit/VOC2012", "VOC2012"), "JPEGImages", "SegmentationClass", (".jpg",), ".png",
    split_file="ImageSets/Segmentation/val.txt", list_from="split",
    splits=(("train", "ImageSets/Segmentation/train.txt"),),
)  # fmt: skip
CONTEXT = Layout(
    "PASCAL-Context (mmseg-converted VOC2010)", ("VOCdevkit/VOC2010", "VOC2010"), "JPEGImages",
    "SegmentationClassContext", (".jpg",), ".png", split_file="ImageSets/SegmentationContext/val.txt",
    list_from="split", splits=(("train", "ImageSets/SegmentationContext/train.txt"),),
)  # fmt: skip
CONTEXT459 = Layout(
    "PASCAL-Context-459 (CAT-Seg-prepared VOC2010)", ("VOCdevkit/VOC2010", "VOC2010"), "JPEGImages",
    "annotations_detectron2/pc459_val", (".jpg",), ".tif", list_from="labels",
)  # fmt: skip
_COCO_DIRS = ("coco_stuff164k", "coco-stuff", "coco")
COCO_OBJECT = Layout(
    "COCO-Object (COCO val2017 + *_instanceTrainIds.png)", _COCO_DIRS, "images/val2017", "annotations/val2017",
    (".jpg",), "_instanceTrainIds.png",
)  # fmt: skip
COCO_STUFF = Layout(
    "COCO-Stuff164k (<split>2017 + *_labelTrainIds.png)", _COCO_DIRS, "images/val2017", "annotations/val2017",
    (".jpg",), "_labelTrainIds.png", split_folders=(("train", "images/train2017", "annotations/train2017"),),
)  # fmt: skip
CITYSCAPES = Layout(
    "Cityscapes (leftImg8bit + gtFine labelTrainIds)", ("cityscapes",), "leftImg8bit/val", "gtFine/val",
    ("_leftImg8bit.png",), "_gtFine_labelTrainIds.png", recursive=True,
)  # fmt: skip
ADE150 = Layout(
    "ADE20K (ADEChallengeData2016)", ("ade/ADEChallengeData2016", "ADEChallengeData2016"), "images/validation",
    "annotations/validation", (".jpg",), ".png",
)  # fmt: skip
ADE847 = Layout(
    "ADE20K-full (CAT-Seg-prepared ADE20K_2021_17_01)", ("ADE20K_2021_17_01", "ade/ADE20K_2021_17_01"),
    "images_detectron2/validation", "annotations_detectron2/validation", (".jpg",), ".tif", list_from="labels",
)  # fmt: skip

# -- the benchmarks -----------------------------------------------------------------------------------
register_dataset(DatasetSpec(
    "voc21", "PASCAL VOC 2012 val, 20 classes + background", VOC, ClassSource("voc", 21, background="stuff"),
    palette="voc", num_images=1449,
))  # fmt: skip
register_dataset(DatasetSpec(
    "voc20", "PASCAL VOC 2012 val, 20 classes (background ignored)", VOC, ClassSource("voc", 20),
    label_rule="reduce_zero_label", palette="voc_no_background", num_images=1449,
))  # fmt: skip
register_dataset(DatasetSpec(
    "context60", "PASCAL-Context val, 59 classes + background", CONTEXT,
    ClassSource("context59", 60, background="literal"), num_images=5105,
))  # fmt: skip
register_dataset(DatasetSpec(
    "context59", "PASCAL-Context val, 59 classes (background ignored)", CONTEXT, ClassSource("context59", 59),
    label_rule="reduce_zero_label", num_images=5105,
))  # fmt: skip
register_dataset(DatasetSpec(
    "context459", "PASCAL-Context val, full 459 classes (CAT-Seg preparation)", CONTEXT459,
    ClassSource("context459", 459), ignore_index=65535, num_images=5105, classes_in_root="labels.txt",
))  # fmt: skip
register_dataset(DatasetSpec(
    "coco_object", "COCO val2017, 80 things + background (GroupViT/TCL conversion)", COCO_OBJECT,
    ClassSource("coco_stuff", 81, take=80, background="stuff"), num_images=5000,
))  # fmt: skip
register_dataset(DatasetSpec(
    "coco_stuff", "COCO-Stuff164k val2017, 171 classes", COCO_STUFF, ClassSource("coco_stuff", 171), num_images=5000,
))  # fmt: skip
register_dataset(DatasetSpec(
    "cityscapes", "Cityscapes val, 19 classes", CITYSCAPES, ClassSource("cityscapes", 19), palette="cityscapes",
    num_images=500,
))  # fmt: skip
register_dataset(DatasetSpec(
    "ade150", "ADE20K val, 150 classes", ADE150, ClassSource("ade150", 150), label_rule="reduce_zero_label",
    num_images=2000,
))  # fmt: skip
register_dataset(DatasetSpec(
    "ade847", "ADE20K-full val, 847 classes (CAT-Seg preparation)", ADE847, ClassSource("ade847", 847),
    ignore_index=65535, num_images=2000,
))  # fmt: skip
register_dataset(DatasetSpec(
    "voc20b", "PASCAL VOC 2012 val, 20 classes + background named by the 39 other PASCAL-Context classes "
    "(CAT-Seg's PAS-20b)", VOC, ClassSource("voc", 21, background="context"), palette="voc", num_images=1449,
))  # fmt: skip

# -- a user's own data --------------------------------------------------------------------------------
FOLDER = Layout("image folder", (), "images", "labels", (".jpg", ".jpeg", ".png"), ".png")


def _build_folder(
    spec: DatasetSpec,
    data_root: str | os.PathLike,
    classes_file: str | os.PathLike | None = None,
    ignore_index: int = 255,
    reduce_zero_label: bool = False,
    background_index: int | None = None,
) -> SegDataset:
    """``DIR/images/<name>.{jpg,jpeg,png}`` + ``DIR/labels/<name>.png`` + a class file (default
    ``DIR/classes.txt``, one class per line in label order)."""
    root = spec.layout.find_root(data_root, spec.name)
    classes_file = Path(classes_file) if classes_file is not None else root / "classes.txt"
    source = ClassSource(None, None, background_index=background_index, shared_names=False)
    return SegDataset(
        name=spec.name,
        root=root,
        samples=spec.layout.samples(root, spec.name),
        vocabulary=source.vocabulary(classes_file, benchmark=spec.name),
        ignore_index=ignore_index,
        label_rule="reduce_zero_label" if reduce_zero_label else "none",
        palette=spec.palette,
        description=f"{spec.description} ({root})",
        notes=[f"class names from {classes_file}"],
    )


register_dataset(DatasetSpec(
    "folder", "your images + label PNGs + class file", FOLDER, ClassSource(None, None), build=_build_folder,
))  # fmt: skip
