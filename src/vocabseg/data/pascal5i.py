"""PASCAL-5i zero-shot episodes (LSeg / Fusioner protocol, HSNet data and lists).

Facts (trained.md §3): VOC classes 1..20 in label order, fold i holds classes 5i+1 .. 5i+5; query
images from VOC2012 ``JPEGImages`` with SBD-augmented ``SegmentationClassAug`` masks; an episode is
an (image, class) pair, scored as a binary mask: a pixel is foreground iff its label is the class,
255 is ignored, every other label (other unseen classes included) is background.

The model gets the image and the episode class's names, plus the VOC background names, and labels
each pixel class or background (the Segmenter vocabulary ``[background, class]``).

Pairs come from HSNet's list ``splits/pascal/val/fold{i}.txt`` (``<image>__<class 1..20>`` lines)
when it is present, else they are derived: every VOC val image containing the class. The episode
policy says how often a pair counts: ``pairs`` (each once, Fusioner) or ``hsnet1000`` (HSNet / LSeg:
1000 episodes, episode k = pair k mod N, so with N < 1000 the first 1000 mod N pairs count once more).
Zero-shot predictions do not depend on the episode, so a repeated pair is computed once and weighted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .._names import lookup
from ..errors import DatasetLayoutError
from ..text.vocabulary import Vocabulary
from .classes import ClassSource, packaged_class_file
from .dataset import SegDataset, check_labels
from .files import read_label_map
from .layouts import Layout, Sample
from .registry import DatasetSpec, register_dataset

NUM_FOLDS = 4
CLASSES_PER_FOLD = 5
HSNET_EPISODES = 1000


def fold_classes(fold: int) -> list[int]:
    """VOC class labels (1..20) of fold ``fold``."""
    if not 0 <= fold < NUM_FOLDS:
        raise ValueError(f"PASCAL-5i fold must be 0..{NUM_FOLDS - 1}, got {fold}")
    return [CLASSES_PER_FOLD * fold + k + 1 for k in range(CLASSES_PER_FOLD)]


def _pairs_once(n: int) -> list[int]:
    return [1] * n


def _hsnet_1000(n: int) -> list[int]:
    """HSNet ``DatasetPASCAL.__len__`` = 1000 for val, item k = pair ``k % n``."""
    return [len(range(i, HSNET_EPISODES, n)) for i in range(n)]


EPISODE_POLICIES = {
    "pairs": (_pairs_once, "each (image, class) pair once"),
    "hsnet1000": (_hsnet_1000, "HSNet's 1000 episodes (episode k = pair k mod N)"),
}

LAYOUT = Layout(
    "PASCAL VOC 2012 + SBD masks (SegmentationClassAug)", ("VOCdevkit/VOC2012", "VOC2012"), "JPEGImages",
    "SegmentationClassAug", (".jpg",), ".png",
)  # fmt: skip
VAL_LIST = "ImageSets/Segmentation/val.txt"


@dataclass
class EpisodeDataset(SegDataset):
    """PASCAL-5i fold: ``vocabulary`` holds the fold's 5 classes; a sample's ``group`` is its class."""

    fold: int = 0
    background_names: tuple[str, ...] = ()
    episodes: str = "pairs"

    @property
    def has_background(self) -> bool:
        return True  # every episode is class vs background

    def vocabulary_for(self, sample: Sample) -> Vocabulary:
        names = self.vocabulary.classes[int(sample.group)].names
        return Vocabulary.from_list([list(self.background_names), list(names)], background_index=0)

    def read_label(self, sample: Sample) -> np.ndarray:
        """Binary labels of the episode class: 1 = class, 0 = anything else, 255 = ignored."""
        raw = read_label_map(sample.label)
        check_labels(raw, 21, 255, sample.label, self.name)
        label = fold_classes(self.fold)[int(sample.group)]
        return np.where(raw == 255, 255, (raw == label).astype(np.int64))

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "fold": self.fold, "background": list(self.background_names)}


def _parse_hsnet_list(path: Path, fold: int) -> list[tuple[str, int]]:
    classes = fold_classes(fold)
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        image, sep, cls = line.strip().rpartition("__")
        if not sep or not cls.isdigit() or int(cls) not in classes:
            raise DatasetLayoutError(
                f"{path}:{n}: expected '<image>__<class>' with a class of fold {fold} ({classes}), got {line!r}"
            )
        pairs.append((image, int(cls)))
    return pairs


def _derive_pairs(root: Path, fold: int, name: str) -> list[tuple[str, int]]:
    split = root / VAL_LIST
    if not split.is_file():
        raise DatasetLayoutError(
            f"{name}: no episode list. Expected HSNet's splits/pascal/val/fold{fold}.txt in {root} or {root.parent} "
            f"(or pass pairs_file / --pairs-file), or {split} to derive the pairs from."
        )
    pairs = []
    for image in dict.fromkeys(ln.strip() for ln in split.read_text().splitlines() if ln.strip()):
        present = set(np.unique(read_label_map(LAYOUT.label_path(root, image))).tolist())
        pairs += [(image, c) for c in fold_classes(fold) if c in present]
    return pairs


def _find_list(root: Path, fold: int) -> Path | None:
    rel = Path("splits/pascal/val") / f"fold{fold}.txt"
    candidates = [root / rel, root / "data" / rel, root.parent / rel, root.parent / "data" / rel]
    return next((p for p in candidates if p.is_file()), None)


def _build_pascal5i(
    spec: DatasetSpec,
    data_root: str | os.PathLike,
    classes_file: str | os.PathLike | None = None,
    episodes: str = "pairs",
    pairs_file: str | os.PathLike | None = None,
    *,
    fold: int,
) -> EpisodeDataset:
    root = LAYOUT.find_root(data_root, spec.name)
    weights_fn, policy_text = lookup(EPISODE_POLICIES, episodes, "episode policy")
    list_path = Path(pairs_file) if pairs_file is not None else _find_list(root, fold)
    if pairs_file is not None and not list_path.is_file():
        raise DatasetLayoutError(f"{spec.name}: episode list not found: expected a file at {list_path}")
    pairs = _parse_hsnet_list(list_path, fold) if list_path else _derive_pairs(root, fold, spec.name)
    if not pairs:
        raise DatasetLayoutError(f"{spec.name}: the episode list is empty ({list_path or root / VAL_LIST}).")
    counts: dict[tuple[str, int], int] = {}
    for pair, w in zip(pairs, weights_fn(len(pairs))):  # weights follow the list order
        counts[pair] = counts.get(pair, 0) + w
    classes = spec.classes.names(classes_file, benchmark=spec.name)
    first = CLASSES_PER_FOLD * fold
    samples = [
        Sample(f"{img}__{c:02d}", LAYOUT.image_path(root, img), LAYOUT.label_path(root, img), c - 1 - first, w)
        for (img, c), w in sorted(counts.items())
        if w > 0
    ]
    missing = [p for s in samples for p in (s.image, s.label) if not p.is_file()]
    if missing:
        raise DatasetLayoutError(
            f"{spec.name}: {len(missing)} image/label files of the episodes are missing, e.g. expected "
            + ", ".join(str(p) for p in missing[:3])
        )
    derived = f"derived from {root / VAL_LIST} (every val image with the class)"
    source = f"HSNet list {list_path}" if list_path else derived
    return EpisodeDataset(
        name=spec.name,
        root=root,
        samples=samples,
        vocabulary=Vocabulary.from_list(classes[first : first + CLASSES_PER_FOLD]),
        palette="binary",
        settings_key=spec.settings_key,
        kind="episodes",
        description=spec.description,
        notes=[f"{len(pairs)} pairs, {source}", f"episode policy: {policy_text}, {sum(counts.values())} episodes"],
        fold=fold,
        background_names=tuple(packaged_class_file("background_stuff")[0]),
        episodes=episodes,
    )


for _fold in range(NUM_FOLDS):
    register_dataset(DatasetSpec(
        f"pascal5i-{_fold}", f"PASCAL-5i fold {_fold}, zero-shot binary episodes ({len(fold_classes(_fold))} classes)",
        LAYOUT, ClassSource("voc", 20),
        settings_key="voc21", build=partial(_build_pascal5i, fold=_fold),
    ))  # fmt: skip
