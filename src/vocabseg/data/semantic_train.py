"""Training on a semantic benchmark's own train split, every class supervised (``TRAIN_DATA`` entries).

COCO-Stuff-171 is CAT-Seg's and FGAseg's training set (``coco_2017_train_stuff_all_sem_seg``: the
118k ``train2017`` images, 171 classes): the converted COCO-Stuff layout,
``images/train2017/*.jpg`` + ``annotations/train2017/*_labelTrainIds.png`` (things 0..79, stuff
80..170, 255 ignored; ``python -m vocabseg.data.convert coco-stuff ROOT --splits train2017``), read
with the same checks as the evaluation split. The class names are the benchmark's (``classnames/
coco_stuff.txt``, or ``data.options.classes_file``, e.g. CAT-Seg's ``datasets/coco.json``, whose stuff
names keep COCO's ``-other`` / ``-stuff`` suffixes).

Validation runs on the benchmark's evaluation split (COCO-Stuff val2017) through the evaluation
harness: the official training evaluates there every 5000 iterations (``DATASETS.TEST`` of CAT-Seg's
``configs/config.yaml``). The zero-shot benchmarks (A-847, PC-459...) are what the run is for, so they
are not used to choose checkpoints; ``--val-limit`` bounds the cost of each validation.
"""

from __future__ import annotations

import os
from typing import Any

from .dataset import SegDataset
from .registry import build_dataset
from .train import SegTrainDataset, TrainTransforms

#: the ``DataConfig.options`` these entries read
OPTIONS = ("classes_file",)


def train_split(
    benchmark: str, config: Any, data_root: str | os.PathLike, transforms: TrainTransforms
) -> SegTrainDataset:
    """``benchmark``'s train split, all its classes supervised, with the recipe's augmentation."""
    dataset = build_dataset(benchmark, data_root, split="train", **dict(config.options))
    return SegTrainDataset.from_benchmark(dataset, transforms)


def val_split(benchmark: str, config: Any, data_root: str | os.PathLike) -> SegDataset:
    """``benchmark``'s evaluation split, with the same class names as training."""
    return build_dataset(benchmark, data_root, **dict(config.options))
