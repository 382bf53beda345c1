"""On-disk layouts: where a benchmark's images, labels and split list live, checked with messages
that name the expected paths and what was found instead.

The layouts are the ones the community's preparation scripts leave behind: the mmseg dataset-prepare
guide (VOC, Context, COCO-Stuff, Cityscapes, ADE20K), the GroupViT/TCL COCO-Object conversion, and
CAT-Seg's detectron2 preparation (``annotations_detectron2`` TIFFs of ADE-847 and PASCAL-Context-459).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import DatasetLayoutError


@dataclass(frozen=True)
class Sample:
    """One evaluation item.

    Attributes:
        id: a stable identifier (relative path without suffix, or ``image__class`` for an episode).
        image, label: file paths.
        group: PASCAL-5i: the episode's class (index among the fold's classes); ``None`` otherwise.
        weight: how many times the item counts (PASCAL-5i episode repeats); 1 otherwise.
    """

    id: str
    image: Path
    label: Path
    group: int | None = None
    weight: int = 1


@dataclass(frozen=True)
class Layout:
    """Attributes:
    title: the dataset's name in messages.
    subdirs: where under ``--data-root`` the dataset root may be ("" = the data root itself).
    images, labels: image and label folders, relative to the dataset root.
    image_suffixes: image file endings (the first one is used with a split list).
    label_suffix: label file ending; a label is ``labels/<id><label_suffix>``.
    split_file: a text file of ids (one per line), relative to the dataset root.
    list_from: which listing defines the ids: ``split``, ``images`` or ``labels``.
    recursive: search sub-folders (Cityscapes keeps one folder per city).
    split: the name of the split this layout reads (the benchmark's evaluation split).
    splits: (name, id list) of the other splits a benchmark ships as lists, e.g. VOC's
        ``("train", "ImageSets/Segmentation/train.txt")``; see :meth:`for_split`.
    split_folders: (name, images, labels) of the other splits a benchmark keeps in folders of their
        own, e.g. COCO-Stuff's ``("train", "images/train2017", "annotations/train2017")``.
    """

    title: str
    subdirs: tuple[str, ...]
    images: str
    labels: str
    image_suffixes: tuple[str, ...]
    label_suffix: str
    split_file: str | None = None
    list_from: str = "images"
    recursive: bool = False
    split: str = "val"
    splits: tuple[tuple[str, str], ...] = ()
    split_folders: tuple[tuple[str, str, str], ...] = ()

    def for_split(self, split: str, name: str = "") -> Layout:
        """The same layout reading ``split``'s id list or folders (itself for its own split), so training
        code opens the train images of a benchmark with the same checks and messages as evaluation."""
        if split == self.split:
            return self
        lists = dict(self.splits)
        folders = {s: (images, labels) for s, images, labels in self.split_folders}
        if split in lists:
            return replace(self, split_file=lists[split], list_from="split", split=split)
        if split in folders:
            images, labels = folders[split]
            return replace(self, images=images, labels=labels, split=split)
        known = ", ".join([self.split, *lists, *folders])
        raise DatasetLayoutError(
            f"{name or self.title}: no {split!r} split is known for {self.title} (known: {known})."
        )

    def required(self) -> list[tuple[str, str]]:
        """(relative path, role) of what a dataset root must contain."""
        req = [(self.images + "/", "images"), (self.labels + "/", "labels")]
        return req + ([(self.split_file, "split list")] if self.split_file else [])

    def find_root(self, data_root: str | os.PathLike, name: str) -> Path:
        """The dataset root under ``data_root`` (itself or one of ``subdirs``) that has this layout."""
        data_root = Path(data_root)
        if not data_root.is_dir():
            raise DatasetLayoutError(f"{name}: the data root {data_root} does not exist (or is not a folder).")
        candidates = list(dict.fromkeys(data_root / s if s else data_root for s in ("", *self.subdirs)))
        present = {c: [p for p, _ in self.required() if (c / p).exists()] for c in candidates}
        for c in candidates:
            if len(present[c]) == len(self.required()):
                return c
        expected = ", ".join(f"{p} ({role})" for p, role in self.required())
        where = " or ".join(str(c) for c in candidates)
        best = max(candidates, key=lambda c: len(present[c]))
        closest = ""
        if present[best]:
            missing = [p for p, _ in self.required() if p not in present[best]]
            closest = f" In {best}: found {', '.join(present[best])} but not {', '.join(missing)}."
        raise DatasetLayoutError(
            f"{name}: no {self.title} layout found. Expected {expected} in {where}.{closest} "
            f"Found in {data_root}: {_listing(data_root)}."
        )

    def samples(self, root: Path, name: str) -> list[Sample]:
        """Every (image, label) pair of the split, sorted by id; missing files are an error."""
        pairs = _LISTERS[self.list_from](self, root)
        if not pairs:
            source = {
                "split": f"{root / str(self.split_file)} (empty)",
                "images": f"*{'|'.join(self.image_suffixes)} files in {root / self.images}",
                "labels": f"*{self.label_suffix} files in {root / self.labels}",
            }[self.list_from]
            found = _listing(root / self.images)
            raise DatasetLayoutError(f"{name}: no samples found; expected {source}. Found: {found}.")
        missing = [p for _, img, lab in pairs for p in (img, lab) if not p.is_file()]
        if missing:
            raise DatasetLayoutError(
                f"{name}: {len(missing)} of {2 * len(pairs)} image/label files are missing, e.g. expected "
                + ", ".join(str(p) for p in missing[:3])
                + f". (Image ids come from {self._id_source(root)}.)"
            )
        return [Sample(i, img, lab) for i, img, lab in sorted(pairs)]

    def _id_source(self, root: Path) -> str:
        return {"split": str(root / str(self.split_file)), "images": str(root / self.images)}.get(
            self.list_from, str(root / self.labels)
        )

    def image_path(self, root: Path, sample_id: str) -> Path:
        """The image of ``sample_id``: the first suffix that exists (the first suffix if none does)."""
        options = [root / self.images / f"{sample_id}{s}" for s in self.image_suffixes]
        return next((p for p in options if p.is_file()), options[0])

    def label_path(self, root: Path, sample_id: str) -> Path:
        return root / self.labels / f"{sample_id}{self.label_suffix}"


def _strip(name: str, suffixes: tuple[str, ...]) -> str | None:
    return next((name[: -len(s)] for s in suffixes if name.endswith(s) and len(name) > len(s)), None)


def _files(folder: Path, suffixes: tuple[str, ...], recursive: bool) -> list[str]:
    """Ids (relative paths, ``/``-separated, suffix removed) of the files ending with ``suffixes``."""
    if not folder.is_dir():
        return []
    found = folder.rglob("*") if recursive else folder.iterdir()
    ids = []
    for p in found:
        sample_id = _strip(p.name, suffixes) if p.is_file() and not p.name.startswith(".") else None
        if sample_id is not None:
            ids.append(p.relative_to(folder).parent.joinpath(sample_id).as_posix())
    return ids


def _from_split(layout: Layout, root: Path) -> list[tuple[str, Path, Path]]:
    ids = [ln.strip() for ln in (root / str(layout.split_file)).read_text().splitlines() if ln.strip()]
    return [(i, layout.image_path(root, i), layout.label_path(root, i)) for i in dict.fromkeys(ids)]


def _from_images(layout: Layout, root: Path) -> list[tuple[str, Path, Path]]:
    ids = _files(root / layout.images, layout.image_suffixes, layout.recursive)
    return [(i, layout.image_path(root, i), layout.label_path(root, i)) for i in ids]


def _from_labels(layout: Layout, root: Path) -> list[tuple[str, Path, Path]]:
    ids = _files(root / layout.labels, (layout.label_suffix,), layout.recursive)
    return [(i, layout.image_path(root, i), layout.label_path(root, i)) for i in ids]


_LISTERS = {"split": _from_split, "images": _from_images, "labels": _from_labels}


def _listing(folder: Path, limit: int = 12) -> str:
    """A short listing of ``folder`` for error messages."""
    if not folder.is_dir():
        return f"nothing ({folder} does not exist)"
    entries = sorted(folder.iterdir())
    names = [e.name + ("/" if e.is_dir() else "") for e in entries[:limit]]
    more = f" (+{len(entries) - limit} more)" if len(entries) > limit else ""
    return (", ".join(names) + more) if names else "an empty folder"
