"""Segmentation metrics, computed once on confusion matrices (``torch.bincount``).

A confusion matrix ``M`` (rows = ground truth, columns = prediction) summed over a split holds
everything both conventions need, so their numbers come from the same accumulation:

* ``mmseg`` (``IoUMetric``, mmseg 0.x ``mean_iou`` alike): IoU_c = M_cc / (row_c + col_c - M_cc) with
  intersections and unions summed over the split; a class with zero union is NaN and left out of
  the mean; a class predicted but absent from the ground truth has IoU 0 and counts. aAcc = trace /
  total, Acc_c = M_cc / row_c (NaN without ground truth), mAcc = nanmean.
* ``detectron2`` (``SemSegEvaluator``, the PC-459 / A-847 convention of CAT-Seg and SAN): only
  classes with ground-truth pixels are scored (``acc_valid = pos_gt > 0``), so a class that is only
  predicted is NaN instead of 0. mIoU, mACC, pACC, fwIoU.

fwIoU = sum_c freq_c * IoU_c with freq_c = row_c / total; classes without ground truth have weight 0,
so it is the same in both conventions. Ground-truth pixels equal to ``ignore_index`` are not scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .._names import lookup


def _check_range(values: Any, what: str, num_classes: int) -> None:
    if len(values) and (int(values.min()) < 0 or int(values.max()) >= num_classes):
        lo, hi = int(values.min()), int(values.max())
        raise ValueError(f"A {what} value is outside 0..{num_classes - 1}: {lo}..{hi}")


def confusion_matrix(
    pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray, num_classes: int, ignore_index: int
) -> torch.Tensor:
    """(C, C) int64 counts of (ground truth, prediction) over the pixels whose label is not ignored.

    Tensors are counted with ``torch.bincount`` on their device (predictions on a GPU stay there),
    numpy arrays with ``np.bincount``, the faster choice on a CPU (torch's element-wise ops cost ~4x
    numpy's for one image single-threaded, far more when threads compete). Both give the same integers.

    Raises:
        ValueError: a prediction or a non-ignored label outside ``0..num_classes-1``, or mismatched shapes.
    """
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"Prediction {tuple(pred.shape)} and label {tuple(gt.shape)} differ in size.")
    if isinstance(pred, torch.Tensor) and isinstance(gt, torch.Tensor):
        valid = gt != ignore_index
        g, p = gt[valid].long().flatten(), pred[valid].long().flatten()
        _check_range(g, "label", num_classes)
        _check_range(p, "prediction", num_classes)
        counts = torch.bincount(g * num_classes + p, minlength=num_classes * num_classes).cpu()
    else:
        pred_np, gt_np = (t.numpy(force=True) if isinstance(t, torch.Tensor) else np.asarray(t) for t in (pred, gt))
        valid = gt_np != ignore_index
        g, p = gt_np[valid].astype(np.int64), pred_np[valid].astype(np.int64)
        _check_range(g, "label", num_classes)
        _check_range(p, "prediction", num_classes)
        counts = torch.from_numpy(np.bincount(g * num_classes + p, minlength=num_classes * num_classes))
    return counts.to(torch.int64).view(num_classes, num_classes)


def _nanmean(x: torch.Tensor) -> float:
    return float(x.nanmean()) if (~x.isnan()).any() else float("nan")


def _stats(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = mat.double()
    return m.diagonal(), m.sum(dim=1), m.sum(dim=0)  # intersection, label area, prediction area


def _fwiou(inter: torch.Tensor, gt: torch.Tensor, union: torch.Tensor) -> float:
    total = gt.sum()
    if total == 0:
        return float("nan")
    has_gt = gt > 0
    return float(((inter[has_gt] / union[has_gt]) * (gt[has_gt] / total)).sum())


def _scored_by_union(gt: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    return union > 0  # mmseg: NaN only when the class is neither labelled nor predicted


def _scored_by_ground_truth(gt: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    return gt > 0  # detectron2: acc_valid = pos_gt > 0 (and iou_valid = acc_valid & union > 0)


CONVENTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mmseg": _scored_by_union,
    "detectron2": _scored_by_ground_truth,
}


def segmentation_metrics(
    mat: torch.Tensor, convention: str = "mmseg", classes: Sequence[int] | None = None
) -> dict[str, Any]:
    """mIoU, mAcc, aAcc (detectron2's pACC), fwIoU and per-class IoU / Acc (NaN = not scored), as
    fractions in [0, 1], from a (C, C) confusion matrix.

    ``classes``: score a subset (the unseen classes of a zero-shot split): IoU and Acc still come from
    the whole matrix (pixels of other classes predicted as one of them are its false positives), but
    mIoU, mAcc and fwIoU are over these classes and aAcc is the accuracy over their pixels. The
    per-class lists keep every class.
    """
    scored = lookup(CONVENTIONS, convention, "metric convention")
    inter, gt, pred = _stats(mat)
    union = gt + pred - inter
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(scored(gt, union), inter / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, inter / gt.clamp(min=1), nan)
    keep = slice(None) if classes is None else torch.as_tensor(list(classes), dtype=torch.long)
    total = gt[keep].sum()
    return {
        "mIoU": _nanmean(iou[keep]),
        "mAcc": _nanmean(acc[keep]),
        "aAcc": float(inter[keep].sum() / total) if total > 0 else float("nan"),
        "fwIoU": _fwiou(inter[keep], gt[keep], union[keep]),
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
    }


def episode_metrics(mats: torch.Tensor) -> dict[str, Any]:
    """PASCAL-5i metrics (HSNet ``AverageMeter.compute_iou``) from per-class binary matrices (K, 2, 2).

    ``mats[k]`` sums the (background, foreground) confusion matrices of every episode of class k
    (weighted by how often the episode counts). mIoU = mean over the K classes of the foreground IoU;
    FB-IoU = mean of background and foreground IoU computed on the sum over all episodes.
    """
    inter = mats.double().diagonal(dim1=1, dim2=2)  # (K, 2)
    union = mats.double().sum(dim=2) + mats.double().sum(dim=1) - inter
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    per_class = torch.where(union[:, 1] > 0, inter[:, 1] / union[:, 1].clamp(min=1), nan)
    fb_union = union.sum(dim=0)
    fb = torch.where(fb_union > 0, inter.sum(dim=0) / fb_union.clamp(min=1), nan)
    return {
        "mIoU": _nanmean(per_class),
        "FB-IoU": _nanmean(fb),
        "IoU": per_class.tolist(),
        "background IoU": float(fb[0]),
        "foreground IoU": float(fb[1]),
    }
