"""Class vocabularies with synonyms and an optional background class.

Syntax (command line and Python strings): classes are separated by ``,`` and the synonyms of one
class by ``;`` — ``"car, road, person; man; woman"`` is three classes, the last with three names.
Class files (:func:`read_class_file`) hold one class per line; on a line, synonyms are separated by
``;`` or ``,`` (so the ``, ``-separated ``cls_*.txt`` files of the SCLIP lineage and the
``; ``-separated ones of ProxyCLIP both read correctly); ``index: name`` lines and JSON lists too.
A class is displayed by its first name; the background class as "background".
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import VocabularyError

BACKGROUND = "background"


@dataclass(frozen=True)
class VocabClass:
    """One class: every name is encoded and the names' probabilities are max-merged."""

    names: tuple[str, ...]


def _clean(name: str) -> str:
    return re.sub(r"\s+", " ", name).strip()


def _key(name: str) -> str:  # CLIP's tokenizer lower-cases and collapses whitespace
    return _clean(name).lower()


@dataclass(frozen=True)
class Vocabulary:
    """An ordered list of classes; ``background_index`` is the class thresholded pixels go to.

    The background class may have no names (then it is reached only through the probability
    threshold), or names such as ``sky; wall; floor`` that compete with the other classes.

    A name may be given once: a list a person types with the same name in two classes is a mistake
    (one class could never win where the name is best), so it is refused. A benchmark's own class
    list is not a mistake to correct but a fact to reproduce: ADE20K-847's WordNet synonyms repeat
    across classes (``screen`` in four, ``bag`` three times as a first name). With ``shared_names``
    such a name is scored once per class that lists it, each class still from its own names; where
    two classes tie, the first wins (argmax), as in the evaluation code that published the numbers.
    """

    classes: tuple[VocabClass, ...]
    background_index: int | None = None
    shared_names: bool = False

    def __post_init__(self) -> None:
        if not self.classes:
            raise VocabularyError("The class list is empty: give at least one class name.")
        seen: dict[str, int] = {}
        for i, cls in enumerate(self.classes):
            if not cls.names and i != self.background_index:
                raise VocabularyError(f"Class {i} has no name.")
            for name in cls.names:
                if not _clean(name):
                    raise VocabularyError(f"Class {i} ({cls.names!r}) contains an empty name.")
                key = _key(name)
                if key in seen and (seen[key] == i or not self.shared_names):
                    where = "twice in the same class" if seen[key] == i else f"in classes {seen[key]} and {i}"
                    raise VocabularyError(f"Duplicate class name {name!r} ({where}); names must be unique.")
                seen[key] = i
        if self.background_index is not None and not 0 <= self.background_index < len(self.classes):
            raise VocabularyError(f"background_index {self.background_index} is out of range.")

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_list(
        cls,
        classes: Iterable[str | Sequence[str]],
        *,
        background_index: int | None = None,
        shared_names: bool = False,
    ) -> Vocabulary:
        """From ``["car", "person; man", ["tv", "television"]]``: a string may carry ``;`` synonyms.
        ``shared_names``: a benchmark's list, whose classes may share a name (see the class docstring)."""
        parsed = []
        for i, item in enumerate(classes):
            names = item.split(";") if isinstance(item, str) else list(item)
            names = [_clean(n) for n in names]
            if not any(names):
                raise VocabularyError(f"Class {i} is empty (got {item!r}).")
            if not all(names):
                raise VocabularyError(f"Class {i} ({item!r}) contains an empty synonym.")
            parsed.append(VocabClass(tuple(names)))
        return cls(tuple(parsed), background_index, shared_names)

    @classmethod
    def parse(cls, text: str) -> Vocabulary:
        """From the command-line syntax ``"car, road, person; man"``."""
        if not text.strip():
            raise VocabularyError("The class list is empty: give class names like 'cat, sofa, tv; monitor'.")
        items = text.split(",")
        if any(not item.strip() for item in items):
            raise VocabularyError(f"Empty class name in {text!r} (two commas in a row, or a trailing comma?).")
        return cls.from_list(items)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, background_index: int | None = None) -> Vocabulary:
        """A class file in any format :func:`read_class_file` reads (the CLI's ``--classes-file``)."""
        return cls.from_list(read_class_file(path), background_index=background_index)

    def with_background(self, names: Sequence[str] = ()) -> Vocabulary:
        """Append a ``background`` class; ``names`` (e.g. ``["sky", "wall"]``) are its text prompts.

        Without names the class has no prompt and is reached only through the probability threshold.
        """
        if self.background_index is not None:
            raise VocabularyError("This vocabulary already has a background class.")
        if BACKGROUND in (_key(n) for c in self.classes for n in c.names):
            raise VocabularyError(
                f"A class is already named {BACKGROUND!r}; give background names with --background "
                "instead of listing 'background' among the classes, or do not ask for a background."
            )
        names = tuple(_clean(n) for n in names)
        if not all(names):
            raise VocabularyError(f"Empty background name in {names!r}.")
        return replace(self, classes=(*self.classes, VocabClass(names)), background_index=len(self.classes))

    def without_background_names(self) -> Vocabulary:
        """The same classes with a background class that has no names (reached by threshold only)."""
        if self.background_index is None or not self.classes[self.background_index].names:
            return self
        classes = list(self.classes)
        classes[self.background_index] = VocabClass(())
        return replace(self, classes=tuple(classes))

    def first_names(self) -> Vocabulary:
        """Each class prompted by its first name only (CAT-Seg's ``get_text_embeds`` takes the part of
        ``"building, edifice"`` before the first comma). The background class keeps all its names: they
        are the things it stands for (PAS-20b's 39 PASCAL-Context classes), not synonyms of one name."""
        if all(len(c.names) <= 1 or i == self.background_index for i, c in enumerate(self.classes)):
            return self
        classes = tuple(
            c if i == self.background_index else VocabClass(c.names[:1]) for i, c in enumerate(self.classes)
        )
        return replace(self, classes=classes)

    # -- views ------------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        """Display names: the first name of each class, ``background`` for the background class."""
        return [BACKGROUND if i == self.background_index else c.names[0] for i, c in enumerate(self.classes)]

    @property
    def prompt_names(self) -> list[str]:
        """Every name to encode, flattened in class order."""
        return [n for c in self.classes for n in c.names]

    @property
    def name_to_class(self) -> list[int]:
        """For each entry of :attr:`prompt_names`, the index of its class."""
        return [i for i, c in enumerate(self.classes) for _ in c.names]

    def __len__(self) -> int:
        return len(self.classes)


ClassNames = list[list[str]]  # one list of synonyms per class, in label order


def parse_class_lines(text: str) -> ClassNames:
    """One class per non-blank line, synonyms separated by ``;`` or ``,``."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return [[n.strip() for n in re.split(r"[;,]", ln) if n.strip()] for ln in lines]


def read_class_file(path: str | os.PathLike) -> ClassNames:
    """A class list in one of the formats the community ships (the one reader of class files):

    * text, one class per line, synonyms separated by ``;`` or ``,`` (SCLIP / ProxyCLIP ``cls_*.txt``);
    * text ``index: name`` lines (PASCAL-Context's ``labels.txt``), ordered by index;
    * JSON, a list of names (CAT-Seg's ``datasets/*.json``).
    """
    path = Path(path)
    if path.is_dir():
        raise VocabularyError(f"Class file {path} is a directory; give a text or JSON file.")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VocabularyError(f"Class file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise VocabularyError(f"Class file {path} is not UTF-8 text: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VocabularyError(f"Class file {path} is not valid JSON: {exc}") from None
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise VocabularyError(f"{path}: expected a JSON list of class names")
        text = "\n".join(names)
    else:
        indexed = [re.match(r"^\s*(\d+)\s*:\s*(.+?)\s*$", ln) for ln in text.splitlines() if ln.strip()]
        if indexed and all(indexed):
            text = "\n".join(name for _, name in sorted((int(m.group(1)), m.group(2)) for m in indexed))
    classes = parse_class_lines(text)
    if not classes:
        raise VocabularyError(f"Class file {path} has no classes.")
    return classes


def parse_background(background: str | Sequence[str] | None) -> tuple[str, ...]:
    """Background names from ``"sky; wall"`` or a list; ``None`` / ``""`` give none.

    The one parser of background names (Python API, command line and REST API): an empty name
    between separators (``"sky;;wall"``, ``";"``) is refused rather than silently dropped.
    """
    if background is None:
        return ()
    names = background.split(";") if isinstance(background, str) else list(background)
    if isinstance(background, str) and not background.strip():
        return ()
    cleaned = tuple(_clean(n) for n in names)
    if not all(cleaned):
        raise VocabularyError(f"Empty background name in {background!r}; separate background names with ';'.")
    return cleaned
