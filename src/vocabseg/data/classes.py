"""Benchmark class names: the packaged class files and how a benchmark's vocabulary is assembled.

The files under ``classnames/`` follow the SCLIP lineage (``configs/cls_<dataset>.txt``): one class
per line in label order, synonyms on one line (separated by ``;``). Each fact is written once:

* ``voc.txt`` (20 VOC classes) serves VOC21, VOC20 and PASCAL-5i;
* ``coco_stuff.txt`` (171 classes, the first 80 being the COCO things) serves COCO-Stuff and COCO-Object;
* ``background_stuff.txt`` is the one-line, 26-name background class of SCLIP's VOC21 / COCO-Object
  files; PASCAL-Context-60's background is the literal word ``background``;
* PAS-20b's background (CAT-Seg's ``voc20b.json``) is the 39 PASCAL-Context-59 classes that are not
  VOC classes, derived from ``context59.txt`` and ``voc.txt``.

A background name that is also a class name of the dataset is dropped (the class keeps it): SCLIP's
COCO-Object file lists ``bed`` both as background and as a class, which makes ``bed`` unreachable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources

from .._names import lookup
from ..errors import DatasetLayoutError, VocabularyError
from ..text.vocabulary import ClassNames, Vocabulary, parse_class_lines, read_class_file


def packaged_class_file(name: str) -> ClassNames:
    """A class file shipped in ``vocabseg/data/classnames/<name>.txt``."""
    files = {p.name[:-4]: p for p in resources.files(__package__).joinpath("classnames").iterdir()}
    path = lookup({k: v for k, v in files.items() if v.name.endswith(".txt")}, name, "class file")
    return parse_class_lines(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class ClassSource:
    """Where a benchmark's class names come from.

    Attributes:
        file: a packaged class file name, or ``None`` when the user must supply the list.
        take: use only the first ``take`` classes of the file (COCO-Object: the 80 things).
        background: ``"stuff"`` (the 26 SCLIP names), ``"literal"`` (the word ``background``),
            ``"context"`` (PAS-20b's 39 PASCAL-Context names) or ``None``; when set, the background
            class is label 0 and the file's classes follow.
        num_classes: the number of classes (a user-supplied list must have exactly this many);
            ``None`` for user datasets, whose class file defines it.
        background_index: for user datasets, the class that thresholded pixels go to.
        shared_names: classes may share a name (a benchmark's list is reproduced as published:
            ADE20K-847 repeats WordNet synonyms across classes, see
            :class:`~vocabseg.text.vocabulary.Vocabulary`); a user's own dataset keeps refusing them.
    """

    file: str | None
    num_classes: int | None
    take: int | None = None
    background: str | None = None
    background_index: int | None = None
    shared_names: bool = True

    @property
    def background_label(self) -> int | None:
        """The label index of the background class (0 for VOC21 / Context-60 / COCO-Object)."""
        return 0 if self.background is not None else self.background_index

    def names(self, user_file: str | os.PathLike | None = None, *, benchmark: str = "") -> ClassNames:
        """Class names in label order, background (if any) first."""
        if user_file is not None:
            classes = read_class_file(user_file)
        elif self.file is None:
            raise DatasetLayoutError(
                f"{benchmark}: vocabseg does not ship the {self.num_classes} class names of this benchmark; "
                f"pass --classes-file FILE (classes_file=...) with one class per line in label order "
                "(e.g. ProxyCLIP's configs/cls_*.txt, or CAT-Seg's datasets/*.json)."
            )
        else:
            classes = packaged_class_file(self.file)[: self.take]
            if self.background is not None:
                classes = [_BACKGROUNDS[self.background](classes), *classes]
        if self.num_classes is not None and len(classes) != self.num_classes:
            source = user_file if user_file is not None else f"packaged {self.file}.txt"
            raise VocabularyError(
                f"{benchmark}: {source} has {len(classes)} classes, but the benchmark has {self.num_classes}."
            )
        return classes

    def vocabulary(self, user_file: str | os.PathLike | None = None, *, benchmark: str = "") -> Vocabulary:
        """The Segmenter vocabulary whose class index equals the dataset label index."""
        names = self.names(user_file, benchmark=benchmark)
        return Vocabulary.from_list(names, background_index=self.background_label, shared_names=self.shared_names)


def _stuff_background(classes: ClassNames) -> list[str]:
    taken = {n.lower() for names in classes for n in names}
    return [n for n in packaged_class_file("background_stuff")[0] if n.lower() not in taken]


def _context_background(classes: ClassNames) -> list[str]:
    """PAS-20b (CAT-Seg): the PASCAL-Context-59 classes that are none of ``classes`` (the VOC ones)."""
    taken = {n.lower() for names in classes for n in names}
    return [n for names in packaged_class_file("context59") for n in names if n.lower() not in taken]


_BACKGROUNDS = {
    "stuff": _stuff_background,
    "literal": lambda classes: ["background"],
    "context": _context_background,
}
