"""Readers for every benchmark layout, on tiny datasets written in the exact on-disk formats."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vocabseg.data import STANDARD_BENCHMARKS, build_dataset, get_dataset_spec, packaged_class_file
from vocabseg.data.synthetic import write_sample, write_synthetic
from vocabseg.errors import DatasetLayoutError, UnknownNameError, VocabularyError


def one_sample(name, tmp_path, raw, nested=False):
    """A dataset of ``name`` with a single sample whose stored label map is ``raw``."""
    spec = get_dataset_spec(name)
    root = write_synthetic(name, tmp_path, num_images=1, size=raw.shape, nested=nested)
    sample_id = build_dataset(name, tmp_path).samples[0].id
    write_sample(spec.layout, root, sample_id, np.zeros((*raw.shape, 3), np.uint8), raw)
    return build_dataset(name, tmp_path)


# stored values -> class indices (ignored = the dataset's ignore index), per the label-handling table
LABEL_CASES = {
    "voc21": ([0, 1, 20, 255], [0, 1, 20, 255]),
    "voc20": ([0, 1, 20, 255], [255, 0, 19, 255]),
    "context60": ([0, 1, 59, 255], [0, 1, 59, 255]),
    "context59": ([0, 1, 59, 255], [255, 0, 58, 255]),
    "coco_object": ([0, 1, 80, 255], [0, 1, 80, 255]),
    "coco_stuff": ([0, 79, 170, 255], [0, 79, 170, 255]),
    "cityscapes": ([0, 7, 18, 255], [0, 7, 18, 255]),
    "ade150": ([0, 1, 150, 255], [255, 0, 149, 255]),
}


@pytest.mark.parametrize("name", list(LABEL_CASES))
def test_label_handling(name, tmp_path):
    stored, expected = LABEL_CASES[name]
    ds = one_sample(name, tmp_path, np.array([stored, stored[::-1]], dtype=np.int64))
    np.testing.assert_array_equal(ds.read_label(ds.samples[0]), [expected, expected[::-1]])
    assert ds.ignore_index == 255


@pytest.mark.parametrize("name", STANDARD_BENCHMARKS)
def test_readers_find_images_labels_and_classes(name, tmp_path):
    write_synthetic(name, tmp_path, num_images=3, size=(20, 30), nested=True, seed=1)
    ds = build_dataset(name, tmp_path)  # the data root is a parent of the dataset folder
    assert ds.root == tmp_path / get_dataset_spec(name).layout.subdirs[0]
    assert len(ds.samples) == 3 and [s.id for s in ds.samples] == sorted(s.id for s in ds.samples)
    sample = ds.samples[1]
    np.testing.assert_array_equal(ds.read_image(sample), np.asarray(Image.open(sample.image).convert("RGB")))
    assert ds.read_label(sample).shape == (20, 30)
    assert ds.num_classes == get_dataset_spec(name).classes.num_classes
    assert any("standard" in n for n in ds.notes)  # 3 images, not the standard split size
    assert build_dataset(name, ds.root).root == ds.root  # ... or the dataset folder itself


def test_class_names_and_background():
    voc21 = get_dataset_spec("voc21").classes.vocabulary(benchmark="voc21")
    stuff = packaged_class_file("background_stuff")[0]
    assert len(stuff) == 26 and voc21.classes[0].names == tuple(stuff)
    assert voc21.background_index == 0 and voc21.class_names[:3] == ["background", "aeroplane", "bicycle"]
    assert voc21.class_names[-1] == "tv monitor" and "screen" in voc21.classes[20].names
    voc20 = get_dataset_spec("voc20").classes.vocabulary()
    assert voc20.background_index is None and voc20.classes == voc21.classes[1:]
    pc60 = get_dataset_spec("context60").classes.vocabulary()
    assert pc60.classes[0].names == ("background",) and len(pc60) == 60 and pc60.class_names[-1] == "wood"
    obj = get_dataset_spec("coco_object").classes.vocabulary()
    stuff171 = get_dataset_spec("coco_stuff").classes.vocabulary()
    assert obj.classes[1:] == stuff171.classes[:80] and obj.class_names[80] == "toothbrush"
    assert "bed" not in obj.classes[0].names and len(obj.classes[0].names) == 25  # 'bed' is a COCO thing
    assert stuff171.class_names[80] == "banner" and stuff171.class_names[-1] == "wood"
    assert get_dataset_spec("ade150").classes.vocabulary().class_names[-1] == "flag"
    assert get_dataset_spec("cityscapes").classes.vocabulary().class_names[6] == "traffic light"


def test_cityscapes_ids_keep_the_city_folder(tmp_path):
    ds = build_dataset("cityscapes", write_synthetic("cityscapes", tmp_path, num_images=2))
    assert [s.id for s in ds.samples] == ["aachen/aachen_000000_000000", "bremen/bremen_000000_000001"]
    assert ds.samples[1].label == tmp_path / "gtFine/val/bremen/bremen_000000_000001_gtFine_labelTrainIds.png"


def test_detectron2_tiff_layouts_and_user_class_lists(tmp_path):
    raw = np.array([[0, 255, 300], [846, 65535, 7]], dtype=np.int64)  # 255 is a class of ADE-847
    names = [f"class {i}" for i in range(847)]
    root = write_synthetic("ade847", tmp_path / "a847", num_images=1, size=(2, 3))
    assert build_dataset("ade847", root).class_names[1] == "building"  # the packaged ade847.txt
    (root / "names.json").write_text(json.dumps(names))
    ds = build_dataset("ade847", root, classes_file=root / "names.json")
    write_sample(get_dataset_spec("ade847").layout, root, ds.samples[0].id, np.zeros((2, 3, 3), np.uint8), raw)
    np.testing.assert_array_equal(ds.read_label(ds.samples[0]), raw)
    assert ds.ignore_index == 65535 and ds.class_names[255] == "class 255"
    (root / "short.txt").write_text("a\nb\n")
    with pytest.raises(VocabularyError, match="has 2 classes, but the benchmark has 847"):
        build_dataset("ade847", root, classes_file=root / "short.txt")
    # PASCAL-Context-459 reads the dataset's own labels.txt ("1: accordion" lines, label = index - 1)
    root = write_synthetic("context459", tmp_path / "pc", num_images=2, classes=[f"n{i}" for i in range(459)])
    ds = build_dataset("context459", tmp_path / "pc")
    assert ds.class_names[:2] == ["n0", "n1"] and ds.num_classes == 459 and ds.read_label(ds.samples[0]).max() <= 65535


def test_folder_dataset(tmp_path):
    root = write_synthetic("folder", tmp_path, num_images=2, classes=["sky", "road; street", "car"])
    ds = build_dataset("folder", root)
    assert ds.class_names == ["sky", "road", "car"] and ds.vocabulary.classes[1].names == ("road", "street")
    raw = np.array([[0, 1, 2, 9]])
    write_sample(get_dataset_spec("folder").layout, root, ds.samples[0].id, np.zeros((1, 4, 3), np.uint8), raw)
    ds = build_dataset("folder", root, ignore_index=9, background_index=0)
    np.testing.assert_array_equal(ds.read_label(ds.samples[0]), raw)
    assert ds.has_background and ds.vocabulary.background_index == 0
    (root / "two.txt").write_text("road\ncar\n")
    ds = build_dataset("folder", root, classes_file=root / "two.txt", ignore_index=9, reduce_zero_label=True)
    np.testing.assert_array_equal(ds.read_label(ds.samples[0]), [[9, 0, 1, 9]])


def test_missing_layout_names_expected_and_found_paths(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset("voc21", tmp_path)
    msg = str(err.value)
    assert "SegmentationClass/ (labels)" in msg and "ImageSets/Segmentation/val.txt (split list)" in msg
    assert f"{tmp_path}/VOCdevkit/VOC2012" in msg  # where else it looked
    assert f"In {tmp_path}: found JPEGImages/ but not SegmentationClass/" in msg
    assert "Found in" in msg and "notes.txt" in msg
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        build_dataset("ade150", tmp_path / "nowhere")


def test_missing_files_and_bad_labels(tmp_path):
    root = write_synthetic("voc21", tmp_path, num_images=3)
    label = root / "SegmentationClass" / "2008_000001.png"
    label.unlink()
    with pytest.raises(DatasetLayoutError, match=f"1 of 6 image/label files are missing, e.g. expected {label}"):
        build_dataset("voc21", root)
    write_synthetic("voc21", tmp_path, num_images=3)
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(label)  # a colour image, not a label map
    ds = build_dataset("voc21", root)
    with pytest.raises(DatasetLayoutError, match="RGB image is not a label map"):
        ds.read_label(ds.samples[1])
    Image.fromarray(np.full((40, 60), 30, np.uint8)).save(label)  # 30 is not a VOC class
    with pytest.raises(DatasetLayoutError, match=r"label value\(s\) \[30\] outside the 21 classes"):
        ds.read_label(ds.samples[1])
    (root / "ImageSets/Segmentation/val.txt").write_text("")
    with pytest.raises(DatasetLayoutError, match="no samples found"):
        build_dataset("voc21", root)
    empty = tmp_path / "coco"
    (empty / "images/val2017").mkdir(parents=True)
    (empty / "annotations/val2017").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match=r"expected \*\.jpg files in .*images/val2017"):
        build_dataset("coco_stuff", empty)


def test_unknown_benchmark_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean 'ade150'"):
        get_dataset_spec("ade15")
