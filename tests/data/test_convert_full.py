"""A-847 / PC-459: the packaged class lists and the conversions to CAT-Seg's detectron2 TIFFs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vocabseg.data import build_dataset
from vocabseg.data.classes import packaged_class_file
from vocabseg.data.convert import ade847_labels, convert_ade847, pc459_labels
from vocabseg.data.convert.__main__ import main as convert_main
from vocabseg.data.convert.ade_full import ADE847_OBJECT_IDS, resize_nearest, target_size
from vocabseg.data.convert.context import CONTEXT59_IDS
from vocabseg.errors import DatasetLayoutError


def test_packaged_lists_have_the_benchmark_sizes():
    ade, pc = packaged_class_file("ade847"), packaged_class_file("context459")
    assert (len(ade), len(pc)) == (847, 459)
    assert ade[0] == ["wall"] and ade[1] == ["building", "edifice"] and ade[846][0] == "adding machine"
    assert pc[0] == ["accordion"] and pc[458] == ["wool"]
    # the 59-class subset's 459-space ids (1-based) name the same classes as context59.txt
    c59 = packaged_class_file("context59")
    assert [pc[i - 1][0] for i in CONTEXT59_IDS[:3]] == ["aeroplane", "bag", "bed"] == [c[0] for c in c59[:3]]
    assert len(ADE847_OBJECT_IDS) == len(set(ADE847_OBJECT_IDS)) == 847


def test_context459_uses_the_packaged_list(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "annotations_detectron2/pc459_val").mkdir(parents=True)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "JPEGImages/2008_000002.jpg")
    Image.fromarray(np.zeros((2, 2), np.uint16)).save(tmp_path / "annotations_detectron2/pc459_val/2008_000002.tif")
    ds = build_dataset("context459", tmp_path)
    assert len(ds.vocabulary.classes) == 459 and ds.vocabulary.classes[1].names == ("aeroplane",)


def ade_seg(classes: np.ndarray) -> np.ndarray:
    """An ADE ``*_seg.png`` encoding object class c as R = c // 256 * 10, G = c % 256."""
    seg = np.zeros((*classes.shape, 3), np.uint8)
    seg[..., 0] = classes // 256 * 10 + 3  # R/10 is truncated: the +3 must not change the class
    seg[..., 1] = classes % 256
    return seg


def test_ade847_label_mapping():
    # wall (2978) -> 0, building (312) -> 1, adding machine (3148) -> 846, 5 (not evaluated) and 0 -> 65535
    classes = np.array([[2978, 312], [3148, 5], [0, 2978]])
    np.testing.assert_array_equal(ade847_labels(ade_seg(classes)), [[0, 1], [846, 65535], [65535, 0]])
    assert target_size(600, 1000) == (512, 853) and target_size(400, 700) is None
    np.testing.assert_array_equal(resize_nearest(np.arange(6).reshape(1, 6), (1, 3)), [[0, 2, 4]])


def test_convert_ade847_to_a_readable_layout(tmp_path):
    root = tmp_path / "ADE20K_2021_17_01"
    with pytest.raises(DatasetLayoutError, match="ADE20K-full images not found"):
        convert_ade847(root)
    scene = root / "images/ADE/validation/cultural/church"
    scene.mkdir(parents=True)
    classes = np.array([[2978, 312, 5], [3148, 2978, 0]])
    Image.fromarray(np.full((2, 3, 3), 128, np.uint8)).save(scene / "ADE_val_00000001.jpg")
    Image.fromarray(ade_seg(classes)).save(scene / "ADE_val_00000001_seg.png")
    assert convert_main(["ade847", str(root)]) == 0
    ds = build_dataset("ade847", root, classes_file=_names_file(tmp_path))
    np.testing.assert_array_equal(ds.read_label(ds.samples[0]), [[0, 1, 65535], [846, 0, 65535]])
    assert convert_ade847(root) == 0  # resumed: the pair exists, nothing rewritten
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(scene / "ADE_val_00000002.jpg")
    with pytest.raises(DatasetLayoutError, match="ADE_val_00000002_seg.png is missing"):
        convert_ade847(root)


def _names_file(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("".join(f"class {i}\n" for i in range(847)))
    return path


def test_pc459_label_mapping():
    np.testing.assert_array_equal(pc459_labels(np.array([[1, 459], [0, 2]])), [[0, 458], [65535, 1]])
    with pytest.raises(ValueError, match=r"LabelMap values \[460\] are outside 0..459"):
        pc459_labels(np.array([[460, 1]]))


def test_convert_context459(tmp_path):
    voc = tmp_path / "VOC2010"
    voc.mkdir()
    assert convert_main(["context459", str(voc)]) == 2  # no trainval/ folder
    savemat = pytest.importorskip("scipy.io").savemat
    (voc / "trainval").mkdir()
    (voc / "JPEGImages").mkdir()
    (voc / "pascalcontext_val.txt").write_text("2008_000002\n2008_000009\n")
    savemat(voc / "trainval/2008_000002.mat", {"LabelMap": np.array([[2, 459], [1, 0]], np.uint16)})
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(voc / "JPEGImages/2008_000002.jpg")
    assert convert_main(["context459", str(voc)]) == 0
    ds = build_dataset("context459", voc)
    np.testing.assert_array_equal(ds.read_label(ds.samples[0]), [[1, 458], [0, 65535]])
