"""Benchmark datasets: readers for the community's on-disk layouts, class names, palettes.

>>> from vocabseg.data import build_dataset
>>> ds = build_dataset("voc21", "data/")  # doctest: +SKIP
>>> ds.num_classes, len(ds.samples)  # doctest: +SKIP
(21, 1449)
"""

from ..text.vocabulary import read_class_file
from . import pascal5i  # noqa: F401  (registers the PASCAL-5i folds)
from .classes import ClassSource, packaged_class_file
from .dataset import LABEL_RULES, SegDataset, apply_label_rule
from .layouts import Layout, Sample
from .palettes import get_palette
from .registry import STANDARD_BENCHMARKS, DatasetSpec, build_dataset, get_dataset_spec

__all__ = [
    "LABEL_RULES",
    "STANDARD_BENCHMARKS",
    "ClassSource",
    "DatasetSpec",
    "Layout",
    "Sample",
    "SegDataset",
    "apply_label_rule",
    "build_dataset",
    "get_dataset_spec",
    "get_palette",
    "packaged_class_file",
    "read_class_file",
]
