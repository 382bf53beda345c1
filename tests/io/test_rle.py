"""COCO RLE: exact round trips, and agreement with pycocotools where it is installed."""

from __future__ import annotations

import numpy as np
import pytest

from vocabseg.io import rle


def masks():
    rng = np.random.default_rng(0)
    yield np.zeros((5, 7), bool)
    yield np.ones((5, 7), bool)
    yield np.eye(6, dtype=bool)
    one = np.zeros((1, 1), bool)
    yield one
    yield ~one
    for _ in range(40):
        h, w = rng.integers(1, 60, size=2)
        yield rng.random((h, w)) < rng.random()
    big = np.zeros((300, 200), bool)  # long runs need several characters per count (and negative deltas)
    big[10:290, 5:150] = True
    big[::7, ::3] ^= True
    yield big


@pytest.mark.parametrize("mask", list(masks()), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}-{int(m.sum())}")
def test_round_trip_is_exact(mask):
    encoded = rle.encode(mask)
    assert encoded["size"] == list(mask.shape)
    assert isinstance(encoded["counts"], str) and encoded["counts"].isascii()
    decoded = rle.decode(encoded)
    assert decoded.dtype == bool and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)
    assert rle.area(encoded) == int(mask.sum())


def test_runs_are_column_major_and_start_with_zeros():
    mask = np.array([[0, 1], [0, 1], [1, 1]], dtype=bool)  # columns: [0,0,1], [1,1,1]
    assert rle.mask_to_runs(mask) == [2, 4]
    assert rle.mask_to_runs(np.ones((2, 2), bool)) == [0, 4]
    assert rle.decode({"size": [3, 2], "counts": [2, 4]}).tolist() == mask.tolist()  # uncompressed counts


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' numpy 2 notice
@pytest.mark.parametrize("mask", list(masks())[::5], ids=lambda m: f"{m.shape[0]}x{m.shape[1]}")
def test_matches_pycocotools(mask):
    coco = pytest.importorskip("pycocotools.mask")
    ours = rle.encode(mask)
    theirs = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert ours["counts"] == theirs["counts"].decode("ascii")
    np.testing.assert_array_equal(coco.decode({"size": ours["size"], "counts": ours["counts"]}), mask)
    assert coco.area(theirs) == rle.area(ours)


def test_encode_labels_partitions_the_label_map():
    labels = np.random.default_rng(1).integers(0, 4, size=(20, 30))
    encoded = rle.encode_labels(labels, 5)
    stacked = np.stack([rle.decode(e) for e in encoded])
    assert (stacked.sum(0) == 1).all()
    np.testing.assert_array_equal(stacked.argmax(0), labels)
    assert rle.area(encoded[4]) == 0


def test_inconsistent_rle_is_refused():
    with pytest.raises(ValueError, match="cover"):
        rle.decode({"size": [3, 3], "counts": [4, 4]})
    with pytest.raises(ValueError, match="2-D"):
        rle.encode(np.zeros((2, 2, 2), bool))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' numpy 2 notice
@pytest.mark.parametrize("mask", list(masks())[::4], ids=lambda m: f"{m.shape[0]}x{m.shape[1]}")
def test_decodes_what_pycocotools_encodes(mask):
    """SA-1B's annotations are pycocotools strings: our decoder must read them (bytes or str)."""
    coco = pytest.importorskip("pycocotools.mask")
    theirs = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
    np.testing.assert_array_equal(rle.decode(theirs), mask)  # counts as bytes
    as_json = {"size": list(theirs["size"]), "counts": theirs["counts"].decode("ascii")}
    np.testing.assert_array_equal(rle.decode(as_json), mask)
    assert rle.area(as_json) == int(mask.sum())
