"""Metrics against hand-computed values: mmseg vs detectron2 conventions, ignore, absent classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vocabseg.eval.metrics import confusion_matrix, episode_metrics, segmentation_metrics

T = torch.tensor


def test_confusion_matrix_counts_and_ignores():
    gt = T([[0, 0, 0, 1], [1, 255, 1, 0]])
    pred = T([[0, 0, 2, 1], [0, 3, 1, 1]])  # the prediction 3 falls on an ignored pixel
    m = confusion_matrix(pred, gt, 4, 255)
    assert m.tolist() == [[2, 1, 1, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]  # rows: ground truth
    assert m.dtype == torch.int64
    assert torch.equal(confusion_matrix(pred.numpy(), gt.numpy().astype(np.uint8), 4, 255), m)  # numpy path


def test_conventions_differ_exactly_on_predicted_but_absent_classes():
    m = T([[2, 1, 1, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    # inter [2, 2, 0, 0], gt [4, 3, 0, 0], pred [3, 3, 1, 0], union [5, 4, 1, 0]
    mm, d2 = segmentation_metrics(m, "mmseg"), segmentation_metrics(m, "detectron2")
    assert mm["IoU"][:3] == pytest.approx([0.4, 0.5, 0.0]) and math.isnan(mm["IoU"][3])
    assert mm["mIoU"] == pytest.approx(0.9 / 3)  # class 2 predicted, absent: IoU 0, counted
    assert d2["IoU"][:2] == pytest.approx([0.4, 0.5]) and math.isnan(d2["IoU"][2]) and math.isnan(d2["IoU"][3])
    assert d2["mIoU"] == pytest.approx(0.45)  # detectron2 scores only classes with ground truth
    for r in (mm, d2):  # everything else is the same accumulation and the same numbers
        assert r["aAcc"] == pytest.approx(4 / 7)
        assert r["Acc"][:2] == pytest.approx([0.5, 2 / 3]) and math.isnan(r["Acc"][2])
        assert r["mAcc"] == pytest.approx((0.5 + 2 / 3) / 2)
        assert r["fwIoU"] == pytest.approx(0.4 * 4 / 7 + 0.5 * 3 / 7)


def test_conventions_agree_without_false_positive_only_classes():
    m = T([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # class 2: no ground truth, never predicted
    mm, d2 = segmentation_metrics(m, "mmseg"), segmentation_metrics(m, "detectron2")
    assert mm["mIoU"] == d2["mIoU"] == pytest.approx((3 / 4 + 2 / 3) / 2)


def test_intersections_and_unions_are_summed_over_the_split():
    a = confusion_matrix(T([0, 0, 0, 0]), T([0, 0, 0, 0]), 2, 255)  # image 1: class 0 perfect
    b = confusion_matrix(T([0, 1, 1, 1]), T([1, 1, 1, 1]), 2, 255)  # image 2: class 1 at 3/4, one FP of 0
    r = segmentation_metrics(a + b)
    # class 0: I = 4, U = 4 + 1 = 5 -> 0.8 ; class 1: I = 3, U = 4 -> 0.75 (per-image averaging would differ)
    assert r["IoU"] == pytest.approx([0.8, 0.75]) and r["mIoU"] == pytest.approx(0.775)


def test_all_ignore_images():
    empty = confusion_matrix(T([[1, 2]]), T([[255, 255]]), 3, 255)
    assert empty.sum() == 0
    r = segmentation_metrics(empty)
    assert math.isnan(r["mIoU"]) and math.isnan(r["aAcc"]) and all(math.isnan(v) for v in r["IoU"])
    m = confusion_matrix(T([0, 1]), T([0, 1]), 3, 255)
    assert torch.equal(m + empty, m) and segmentation_metrics(m + empty)["mIoU"] == 1.0


def test_out_of_range_values_are_refused():
    with pytest.raises(ValueError, match="prediction value is outside 0..2"):
        confusion_matrix(T([0, 3]), T([0, 1]), 3, 255)
    with pytest.raises(ValueError, match="prediction value is outside 0..2"):
        confusion_matrix(np.array([-1, 0]), np.array([0, 1]), 3, 255)
    with pytest.raises(ValueError, match="label value is outside 0..2"):
        confusion_matrix(T([0, 1]), T([0, 7]), 3, 255)
    with pytest.raises(ValueError, match="differ in size"):
        confusion_matrix(T([0, 1]), T([[0, 1]]), 3, 255)
    with pytest.raises(KeyError):
        segmentation_metrics(T([[1]]), "torchmetrics")


def test_episode_metrics_by_hand():
    mats = T(
        [
            [[5, 1], [2, 2]],  # class a: TN 5, FP 1, FN 2, TP 2 -> fg IoU 2 / 5
            [[3, 0], [1, 0]],  # class b: missed entirely -> fg IoU 0
            [[0, 0], [0, 0]],  # class c: no episode -> not scored
        ]
    )
    r = episode_metrics(mats)
    assert r["IoU"][:2] == pytest.approx([0.4, 0.0]) and math.isnan(r["IoU"][2])
    assert r["mIoU"] == pytest.approx(0.2)
    # summed over every episode: [[8, 1], [3, 2]] -> bg IoU 8 / 12, fg IoU 2 / 6
    assert r["background IoU"] == pytest.approx(2 / 3) and r["foreground IoU"] == pytest.approx(1 / 3)
    assert r["FB-IoU"] == pytest.approx(0.5)
