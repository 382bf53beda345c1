"""The benchmarks of CAT-Seg's table: A-847 from its packaged list (synonyms shared between classes),
PAS-20b (VOC with the other PASCAL-Context classes as the background's names), and how a benchmark's
list differs from one a person types."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vocabseg.cli.eval import expand_benchmarks
from vocabseg.data import build_dataset
from vocabseg.data.classes import packaged_class_file
from vocabseg.data.registry import CATSEG_BENCHMARKS
from vocabseg.data.synthetic import write_synthetic
from vocabseg.errors import VocabularyError
from vocabseg.text.vocabulary import Vocabulary

# CAT-Seg's datasets/voc20b.json after its 20 VOC classes: the names PAS-20b's background stands for
VOC20B_BACKGROUND = [
    "bag", "bed", "bench", "book", "building", "cabinet", "ceiling", "cloth", "computer", "cup", "door", "fence",
    "floor", "flower", "food", "grass", "ground", "keyboard", "light", "mountain", "mouse", "curtain", "platform",
    "sign", "plate", "road", "rock", "shelves", "sidewalk", "sky", "snow", "bedclothes", "track", "tree", "truck",
    "wall", "water", "window", "wood",
]  # fmt: skip


def test_ade847_reads_its_packaged_list_with_shared_synonyms(tmp_path):
    ds = build_dataset("ade847", write_synthetic("ade847", tmp_path, num_images=2))
    vocab = ds.vocabulary
    assert len(vocab) == 847 and vocab.shared_names and vocab.background_index is None
    assert vocab.classes[1].names == ("building", "edifice") and vocab.class_names[846] == "adding machine"
    owners: dict[str, list[int]] = {}
    for i, c in enumerate(vocab.classes):
        for n in c.names:
            owners.setdefault(n.lower(), []).append(i)
    shared = {n: c for n, c in owners.items() if len(c) > 1}
    assert len(shared) == 41 and len(shared["screen"]) == 4  # each class still has its own copy of the name
    assert [i for i, c in enumerate(vocab.first_names().classes) if c.names == ("bag",)] == owners["bag"][:3]
    assert len(vocab.prompt_names) == sum(len(c.names) for c in vocab.classes)
    label = ds.read_label(ds.samples[0])
    assert label[label != 65535].max() < 847 and (label == 65535).any()


def test_a_classes_file_for_ade847_may_share_names_too(tmp_path):
    """CAT-Seg's own ``datasets/ade847.json`` (``"a, b"`` synonyms) reads as the packaged list does."""
    root = write_synthetic("ade847", tmp_path / "data", num_images=1)
    names = [", ".join(c) for c in packaged_class_file("ade847")]
    (tmp_path / "ade847.json").write_text(json.dumps(names))
    ds = build_dataset("ade847", root, classes_file=tmp_path / "ade847.json")
    assert [c.names for c in ds.vocabulary.classes] == [tuple(c) for c in packaged_class_file("ade847")]


def test_lists_a_person_types_still_refuse_a_name_in_two_classes(tmp_path):
    with pytest.raises(VocabularyError, match=r"Duplicate class name 'screen' \(in classes 0 and 1\)"):
        Vocabulary.parse("tv; screen, door; screen")
    with pytest.raises(VocabularyError, match="twice in the same class"):
        Vocabulary.from_list(["bag; bag"], shared_names=True)  # within a class it is a mistake either way
    root = write_synthetic("folder", tmp_path, num_images=1, classes=["tv; screen", "door; screen"])
    with pytest.raises(VocabularyError, match="Duplicate class name 'screen'"):
        build_dataset("folder", root)
    shared = Vocabulary.from_list(["tv; screen", "door; screen"], shared_names=True)
    assert shared.name_to_class == [0, 0, 1, 1] and shared.with_background(["sky"]).shared_names


def test_first_names_keep_the_background_whole():
    vocab = Vocabulary.from_list(["cat; kitten", "sofa"]).with_background(["sky", "wall"])
    first = vocab.first_names()
    assert [c.names for c in first.classes] == [("cat",), ("sofa",), ("sky", "wall")]
    assert first.background_index == 2 and first.first_names() is first


def test_voc20b_is_voc_with_the_other_context_classes_as_background(tmp_path):
    ds = build_dataset("voc20b", write_synthetic("voc20b", tmp_path, num_images=2))
    vocab = ds.vocabulary
    assert len(vocab) == 21 and vocab.background_index == 0 and ds.has_background
    assert sorted(vocab.classes[0].names) == sorted(VOC20B_BACKGROUND)
    assert [c.names[0] for c in vocab.classes[1:]] == [c[0] for c in packaged_class_file("voc")]
    label = ds.read_label(ds.samples[0])  # raw VOC labels: 0 background, 1..20 the classes, 255 ignored
    assert set(np.unique(label)) <= set(range(21)) | {255} and (label == 255).any()


def test_the_catseg_group_names_its_six_benchmarks():
    assert expand_benchmarks("catseg") == list(CATSEG_BENCHMARKS)
    assert CATSEG_BENCHMARKS == ("ade847", "context459", "ade150", "context59", "voc20", "voc20b")
