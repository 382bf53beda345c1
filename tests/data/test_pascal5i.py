"""PASCAL-5i: fold classes, episode lists and policies, binary labels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vocabseg.data import build_dataset
from vocabseg.data.pascal5i import LAYOUT, fold_classes
from vocabseg.data.synthetic import write_sample, write_synthetic_pascal5i
from vocabseg.errors import DatasetLayoutError


def test_fold_classes():
    assert fold_classes(0) == [1, 2, 3, 4, 5] and fold_classes(3) == [16, 17, 18, 19, 20]
    with pytest.raises(ValueError):
        fold_classes(4)


def write_list(root, fold, lines):
    path = root / "splits/pascal/val" / f"fold{fold}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{ln}\n" for ln in lines))


def test_hsnet_1000_episodes_weights(tmp_path):
    root = write_synthetic_pascal5i(tmp_path, num_images=2)
    # 346 pairs (fold 0's size): 1000 = 2 * 346 + 308, so the first 308 pairs count 3 times, the rest twice
    names = [f"2007_{k:06d}" for k in range(2)]
    lines = [f"{names[k % 2]}__{(k % 5) + 1:02d}" for k in range(346)]  # repeats; duplicates get summed
    write_list(root, 0, lines)
    ds = build_dataset("pascal5i-0", root, episodes="hsnet1000")
    assert sum(s.weight for s in ds.samples) == 1000
    expected = {}
    for k, line in enumerate(lines):
        expected[line] = expected.get(line, 0) + (3 if k < 308 else 2)
    assert {s.id: s.weight for s in ds.samples} == expected
    once = build_dataset("pascal5i-0", root, episodes="pairs")
    assert sum(s.weight for s in once.samples) == 346 and {s.id for s in once.samples} == set(lines)


def test_episode_labels_and_vocabulary(tmp_path):
    root = write_synthetic_pascal5i(tmp_path, num_images=1, size=(2, 3))
    raw = np.array([[0, 7, 8], [255, 7, 20]])  # fold 1 = classes 6..10: 7 = car, 8 = cat
    write_sample(LAYOUT, root, "2007_000000", np.zeros((2, 3, 3), np.uint8), raw)
    write_list(root, 1, ["2007_000000__07", "2007_000000__08"])
    ds = build_dataset("pascal5i-1", root)
    car, cat = ds.samples
    assert (car.id, car.group, cat.group) == ("2007_000000__07", 1, 2)
    np.testing.assert_array_equal(ds.read_label(car), [[0, 1, 0], [255, 1, 0]])  # other classes = background
    np.testing.assert_array_equal(ds.read_label(cat), [[0, 0, 1], [255, 0, 0]])
    vocab = ds.vocabulary_for(car)
    assert vocab.class_names == ["background", "car"] and vocab.background_index == 0
    assert "sky" in vocab.classes[0].names and ds.class_names == ["bus", "car", "cat", "chair", "cow"]
    assert ds.has_background and ds.settings_key == "voc21"


def test_derived_pairs_without_a_list(tmp_path):
    root = write_synthetic_pascal5i(tmp_path / "VOCdevkit/VOC2012", num_images=3, seed=3)
    ds = build_dataset("pascal5i-2", tmp_path)
    expected = []
    for k in range(3):
        labels = np.asarray(Image.open(root / f"SegmentationClassAug/2007_{k:06d}.png"))
        expected += [f"2007_{k:06d}__{c:02d}" for c in fold_classes(2) if (labels == c).any()]
    assert [s.id for s in ds.samples] == sorted(expected) and expected
    assert any("derived from" in n for n in ds.notes)


def test_bad_lists(tmp_path):
    root = write_synthetic_pascal5i(tmp_path, num_images=1)
    write_list(root, 0, ["2007_000000__09"])  # class 9 belongs to fold 1
    with pytest.raises(DatasetLayoutError, match=r"fold0.txt:1: expected '<image>__<class>' with a class of fold 0"):
        build_dataset("pascal5i-0", root)
    with pytest.raises(DatasetLayoutError, match="episode list not found"):
        build_dataset("pascal5i-0", root, pairs_file=root / "nope.txt")
    (root / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="no episode list"):
        build_dataset("pascal5i-3", root)
