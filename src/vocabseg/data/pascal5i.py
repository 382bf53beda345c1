"""PASCAL-5i zero-shot episodes (LSeg / Fusioner protocol, HSNet data and lists).

Facts (Shaban et al., BMVC 2017; the LSeg / Fusioner zero-shot protocol): VOC classes 1..20 in
label order, fold i holds classes 5i+1 .. 5i+5; query
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

Training (:func:`build_pascal5i_train`) is leave-one-fold-out: the 15 classes of the other folds are
supervised, the held-out fold's 5 never are, and VOC val images are never trained on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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
from .train import SegTrainDataset, TrainTransforms

NUM_FOLDS = 4
CLASSES_PER_FOLD = 5
HSNET_EPISODES = 1000
VOC_CLASSES = ClassSource("voc", 20)


def fold_classes(fold: int) -> list[int]:
    """VOC class labels (1..20) of fold ``fold``."""
    if not 0 <= fold < NUM_FOLDS:
        raise DatasetLayoutError(f"PASCAL-5i fold must be 0..{NUM_FOLDS - 1}, got {fold}")
    return [CLASSES_PER_FOLD * fold + k + 1 for k in range(CLASSES_PER_FOLD)]


def seen_classes(fold: int) -> list[int]:
    """VOC class labels (1..20) trained on when fold ``fold`` is held out: the other folds' 15."""
    held_out = fold_classes(fold)
    return [c for c in range(1, NUM_FOLDS * CLASSES_PER_FOLD + 1) if c not in held_out]


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


def _parse_pairs(path: Path, classes: list[int], what: str) -> list[tuple[str, int]]:
    """``<image>__<class>`` lines whose class must be one of ``classes`` (``what`` names them)."""
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        image, sep, cls = line.strip().rpartition("__")
        if not sep or not cls.isdigit() or int(cls) not in classes:
            raise DatasetLayoutError(
                f"{path}:{n}: expected '<image>__<class>' with a class of {what} ({classes}), got {line!r}"
            )
        pairs.append((image, int(cls)))
    return pairs


def _parse_hsnet_list(path: Path, fold: int) -> list[tuple[str, int]]:
    return _parse_pairs(path, fold_classes(fold), f"fold {fold}")


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


def _list_candidates(root: Path, fold: int, split: str) -> list[Path]:
    """Where HSNet's ``splits/pascal/{split}/fold{fold}.txt`` may be: in or beside the VOC root."""
    rel = Path("splits/pascal") / split / f"fold{fold}.txt"
    return [root / rel, root / "data" / rel, root.parent / rel, root.parent / "data" / rel]


def _find_list(root: Path, fold: int, split: str = "val") -> Path | None:
    return next((p for p in _list_candidates(root, fold, split) if p.is_file()), None)


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


# -- training (leave-one-fold-out) --------------------------------------------------------------------
#: Id lists a training set is derived from, first found wins: the SBD-augmented set (DeepLab's and
#: HSNet's ``train_aug.txt``, mmseg's ``trainaug.txt``), else VOC's own train list.
TRAIN_LISTS = (
    "ImageSets/Segmentation/train_aug.txt",
    "ImageSets/Segmentation/trainaug.txt",
    "ImageSets/Segmentation/train.txt",
)
UNSEEN_POLICIES = {
    "ignore": "held-out class pixels ignored (neither positive nor negative)",
    "background": "held-out class pixels trained as background (HSNet / LSeg)",
}


class Pascal5iTargets:
    """Stored VOC labels -> training targets of a fold (picklable for DataLoader workers):
    seen class ``k``-th of :func:`seen_classes` -> ``k``, VOC background 0 -> ``background_index``,
    255 -> 255, held-out classes -> 255 or ``background_index`` (``unseen``), anything else -> -1
    (refused by the dataset's label check)."""

    def __init__(self, fold: int, unseen: str = "ignore") -> None:
        lookup(UNSEEN_POLICIES, unseen, "unseen-class policy")
        seen = seen_classes(fold)
        self.background_index = len(seen)
        self.table = np.full(256, -1, dtype=np.int64)
        self.table[0] = self.background_index
        self.table[255] = 255
        self.table[seen] = np.arange(len(seen))
        self.table[fold_classes(fold)] = 255 if unseen == "ignore" else self.background_index

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        out = np.full(raw.shape, -1, dtype=np.int64)
        inside = (raw >= 0) & (raw < len(self.table))
        out[inside] = self.table[raw[inside]]
        return out


def _read_ids(path: Path) -> list[str]:
    return list(dict.fromkeys(ln.strip() for ln in path.read_text().splitlines() if ln.strip()))


def _hsnet_train_images(root: Path, fold: int, name: str) -> tuple[list[str], list[str]] | None:
    """Images of HSNet's ``trn`` lists of the other folds (None when there are none)."""
    others = [k for k in range(NUM_FOLDS) if k != fold]
    lists = {k: _find_list(root, k, "trn") for k in others}
    if not any(lists.values()):
        return None
    missing = [k for k, path in lists.items() if path is None]
    if missing:
        expected = "; ".join(" or ".join(str(p) for p in _list_candidates(root, k, "trn")[:2]) for k in missing)
        raise DatasetLayoutError(
            f"{name}: HSNet's training lists are incomplete: found {', '.join(str(p) for p in lists.values() if p)} "
            f"but not {expected}. Training for fold {fold} reads the lists of folds {others}."
        )
    images = [img for k in others for img, _ in _parse_hsnet_list(lists[k], k)]
    return images, [f"images of HSNet lists {', '.join(str(lists[k]) for k in others)}"]


def _derived_train_images(root: Path, fold: int, name: str, excluded: set[str]) -> tuple[list[str], list[str]]:
    """Every image of the first list in :data:`TRAIN_LISTS` that shows a seen class."""
    split = next((root / rel for rel in TRAIN_LISTS if (root / rel).is_file()), None)
    if split is None:
        raise DatasetLayoutError(
            f"{name}: no training list. Expected HSNet's splits/pascal/trn/fold<k>.txt (k != {fold}) in {root} or "
            f"{root.parent} (or pass pairs_file), "
            f"or one of {', '.join(str(root / rel) for rel in TRAIN_LISTS)} to derive the images from."
        )
    seen = seen_classes(fold)
    images = []
    for image in _read_ids(split):
        if image not in excluded and np.isin(read_label_map(LAYOUT.label_path(root, image)), seen).any():
            images.append(image)
    return images, [f"derived from {split} (every image showing one of the 15 seen classes)"]


def build_pascal5i_train(
    data_root: str | os.PathLike,
    fold: int,
    transforms: TrainTransforms,
    *,
    pairs_file: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    unseen: str = "ignore",
) -> SegTrainDataset:
    """The training side of PASCAL-5i fold ``fold``: images of the other three folds' classes.

    Images come from ``pairs_file`` (``<image>__<class>`` lines, classes of the other folds only), else
    HSNet's ``splits/pascal/trn/fold{k}.txt`` for every k != ``fold`` (searched where the val lists are),
    else every image of ``train_aug.txt`` / ``trainaug.txt`` / ``train.txt`` that shows a seen class.
    Images listed in VOC's ``val.txt`` are always dropped, and each image is one sample (pairs of the
    same image are merged).

    Targets are multi-class over the 15 seen classes, so one pass supervises every seen object:
    ``0..14`` = :func:`seen_classes` in VOC order, ``background_index`` 15 = VOC background ("none of the
    classes", trained as a negative for every class), 255 = VOC's boundary band. The held-out fold's
    5 classes are never a positive: ``unseen="ignore"`` (default) leaves their pixels out of the loss,
    since calling them background would teach the model to reject exactly the classes it is tested on;
    ``unseen="background"`` trains them as background, as HSNet and LSeg do (the "inductive" setting).
    """
    name = f"pascal5i-{fold}-train"
    targets = Pascal5iTargets(fold, unseen)  # checks fold and unseen first
    root = LAYOUT.find_root(data_root, name)
    val_path = root / VAL_LIST
    val_ids = set(_read_ids(val_path)) if val_path.is_file() else set()
    if pairs_file is not None:
        files = [Path(pairs_file)] if isinstance(pairs_file, (str, os.PathLike)) else [Path(p) for p in pairs_file]
        for path in files:
            if not path.is_file():
                raise DatasetLayoutError(f"{name}: training pairs list not found: expected a file at {path}")
        what = f"the classes trained on with fold {fold} held out"
        images = [img for path in files for img, _ in _parse_pairs(path, seen_classes(fold), what)]
        notes = [f"images of {', '.join(str(p) for p in files)}"]
    else:
        found = _hsnet_train_images(root, fold, name)
        images, notes = found if found is not None else _derived_train_images(root, fold, name, val_ids)
    listed = list(dict.fromkeys(images))
    kept = [img for img in listed if img not in val_ids]
    if not kept:
        raise DatasetLayoutError(
            f"{name}: no training images: {notes[0]} gives {len(listed)}, {len(listed) - len(kept)} of them "
            f"listed in {val_path} (never trained on)."
        )
    if len(kept) < len(listed):
        notes.append(f"dropped {len(listed) - len(kept)} images listed in {val_path}")
    samples = [Sample(img, LAYOUT.image_path(root, img), LAYOUT.label_path(root, img)) for img in sorted(kept)]
    missing = [p for s in samples for p in (s.image, s.label) if not p.is_file()]
    if missing:
        raise DatasetLayoutError(
            f"{name}: {len(missing)} of {2 * len(samples)} image/label files of the training images are missing, "
            "e.g. expected " + ", ".join(str(p) for p in missing[:3])
        )
    names = VOC_CLASSES.names(benchmark=name)
    notes += [
        f"{len(samples)} images, classes {seen_classes(fold)} supervised, fold {fold} ({fold_classes(fold)}) held out",
        UNSEEN_POLICIES[unseen],
    ]
    return SegTrainDataset(
        samples,
        targets,
        [names[c - 1] for c in seen_classes(fold)],
        transforms,
        name=name,
        background_index=targets.background_index,
        notes=notes,
    )


for _fold in range(NUM_FOLDS):
    register_dataset(DatasetSpec(
        f"pascal5i-{_fold}", f"PASCAL-5i fold {_fold}, zero-shot binary episodes ({len(fold_classes(_fold))} classes)",
        LAYOUT, VOC_CLASSES,
        settings_key="voc21", build=partial(_build_pascal5i, fold=_fold),
    ))  # fmt: skip
