"""Conversions to the community layouts: COCO-Object / COCO-Stuff train ids, PASCAL-Context-60."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vocabseg.data import build_dataset
from vocabseg.data.convert import convert_coco, convert_context, convert_mask, decode_rle
from vocabseg.data.convert.__main__ import main as convert_main
from vocabseg.errors import DatasetLayoutError
from vocabseg.io.rle import string_to_runs as decode_counts


def test_compressed_rle_counts_by_hand():
    # counts [0, 40, 5, 10]: '0'; 40 = 8 + 1*32 -> '8'|0x20 = 'X', then '1'; '5'; then 10 - 40 = -30 is stored
    # as 5-bit groups 2 (|0x20 more) and 31 (sign bit 0x10 set): 'R', 'O'
    assert decode_counts("0X15RO") == [0, 40, 5, 10]
    mask = decode_rle({"size": [5, 11], "counts": "0X15RO"})
    assert mask.shape == (5, 11) and mask.sum() == 50
    flat = mask.T.reshape(-1)  # column-major
    assert flat[:40].all() and not flat[40:45].any() and flat[45:].all()


def test_rle_matches_pycocotools():
    mask_util = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    m = (rng.random((37, 53)) > 0.6).astype(np.uint8)
    m[:, 10:30] = 1  # long runs (multi-group counts, negative differences)
    rle = mask_util.encode(np.asfortranarray(m))
    np.testing.assert_array_equal(decode_rle({"size": rle["size"], "counts": rle["counts"].decode()}), m)


def test_rle_refuses_wrong_sizes():
    with pytest.raises(ValueError, match="cover 5 pixels, expected 2 x 3"):
        decode_rle({"size": [2, 3], "counts": [2, 3]})


def test_coco_train_ids():
    # stuffthingmaps value = COCO id - 1: 0 person, 12 stop sign (id 13, train id 11), 89 toothbrush,
    # 91 banner (first stuff), 181 wood (last stuff), 255 unlabelled
    raw = np.array([[0, 12, 89], [91, 181, 255]])
    np.testing.assert_array_equal(convert_mask(raw, "coco_stuff"), [[0, 11, 79], [80, 170, 255]])
    np.testing.assert_array_equal(convert_mask(raw, "coco_object"), [[1, 12, 80], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"values \[11, 90\] are not COCO-Stuff categories"):
        convert_mask(np.array([[11, 90, 0]]), "coco_object")


def test_convert_coco_to_a_readable_layout(tmp_path):
    ann, img = tmp_path / "annotations/val2017", tmp_path / "images/val2017"
    ann.mkdir(parents=True)
    img.mkdir(parents=True)
    raw = np.array([[0, 12], [181, 255]], dtype=np.uint8)
    Image.fromarray(raw).save(ann / "000000000139.png")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(img / "000000000139.jpg")
    assert convert_main(["coco-object", str(tmp_path)]) == 0
    assert convert_coco(tmp_path, "coco_stuff") == 1  # the TrainIds files written next to it are skipped
    obj = build_dataset("coco_object", tmp_path)
    np.testing.assert_array_equal(obj.read_label(obj.samples[0]), [[1, 12], [0, 0]])
    stuff = build_dataset("coco_stuff", tmp_path)
    np.testing.assert_array_equal(stuff.read_label(stuff.samples[0]), [[0, 11], [170, 255]])
    with pytest.raises(DatasetLayoutError, match="No COCO-Stuff stuffthingmaps PNGs"):
        convert_coco(tmp_path, "coco_object", splits=("train2017",))


def rle_of(mask):
    """Uncompressed COCO RLE of a 0/1 mask (column-major runs starting with zeros)."""
    flat, runs, value, n = mask.T.reshape(-1), [], 0, 0
    for v in flat:
        if v != value:
            runs.append(n)
            value, n = v, 0
        n += 1
    return {"size": list(mask.shape), "counts": [*runs, n]}


def test_convert_context_from_json(tmp_path):
    voc = tmp_path / "VOC2010"
    (voc / "JPEGImages").mkdir(parents=True)
    for name in ("2008_000002", "2008_000001"):
        Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
    a = np.array([[1, 1, 0], [1, 0, 0]], np.uint8)
    b = np.array([[0, 1, 1], [0, 0, 0]], np.uint8)
    data = {
        "images": [
            {"image_id": 7, "file_name": "2008_000002.jpg", "phase": "val", "height": 2, "width": 3},
            {"image_id": 8, "file_name": "2008_000001.jpg", "phase": "train", "height": 2, "width": 3},
        ],
        "annos_segmentation": [  # aeroplane (id 2 -> 1), then wood (id 458 -> 59) painted over it
            {"image_id": 7, "category_id": 2, "segmentation": rle_of(a)},
            {"image_id": 7, "category_id": 458, "segmentation": rle_of(b)},
            {"image_id": 8, "category_id": 9, "segmentation": rle_of(a)},
        ],
    }
    (tmp_path / "trainval_merged.json").write_text(json.dumps(data))
    assert convert_context(tmp_path / "trainval_merged.json", voc) == 1
    assert (voc / "ImageSets/SegmentationContext/val.txt").read_text() == "2008_000002\n"
    assert not (voc / "SegmentationClassContext/2008_000001.png").exists()  # train phase not asked for
    pc60 = build_dataset("context60", voc)
    np.testing.assert_array_equal(pc60.read_label(pc60.samples[0]), [[1, 59, 59], [1, 0, 0]])
    pc59 = build_dataset("context59", voc)
    np.testing.assert_array_equal(pc59.read_label(pc59.samples[0]), [[0, 58, 58], [0, 255, 255]])
    data["annos_segmentation"].append({"image_id": 7, "category_id": 1, "segmentation": rle_of(a)})
    (tmp_path / "trainval_merged.json").write_text(json.dumps(data))
    assert convert_main(["context", str(tmp_path / "trainval_merged.json"), str(voc)]) == 2  # id 1 not in the 59


def test_coco_object_from_instances(tmp_path):
    data = {
        "images": [{"id": 139, "file_name": "000000000139.jpg", "height": 4, "width": 5}],
        "annotations": [
            {"id": 1, "image_id": 139, "category_id": 90, "area": 2, "iscrowd": 1,  # toothbrush -> 80, on top
             "segmentation": {"size": [4, 5], "counts": [5, 2, 13]}},  # column-major: (1, 1) and (2, 1)
            {"id": 2, "image_id": 139, "category_id": 1, "area": 20, "iscrowd": 0,  # person -> 1, everywhere
             "segmentation": [[0, 0, 5, 0, 5, 4, 0, 4]]},
        ],
    }  # fmt: skip
    (tmp_path / "instances_val2017.json").write_text(json.dumps(data))
    (tmp_path / "images/val2017").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "images/val2017/000000000139.jpg")
    args = ["coco-object-from-instances", str(tmp_path / "instances_val2017.json"), str(tmp_path)]
    assert convert_main(args) == 0
    ds = build_dataset("coco_object", tmp_path)
    expected = np.ones((4, 5), np.int64)
    expected[1:3, 1] = 80
    np.testing.assert_array_equal(ds.read_label(ds.samples[0]), expected)
    data["annotations"][0]["category_id"] = 12  # an unused COCO id
    (tmp_path / "instances_val2017.json").write_text(json.dumps(data))
    assert convert_main(args) == 2
