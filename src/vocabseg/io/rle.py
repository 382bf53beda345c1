"""COCO run-length encoding of binary masks, compatible with ``pycocotools.mask``.

Written here (60 lines of numpy) so the server does not need pycocotools' compiled extension; the
tests check that pycocotools decodes what this encodes. Runs are counted in column-major (Fortran)
order, start with a run of zeros, and are compressed into the ASCII string of COCO's ``rleToString``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def mask_to_runs(mask: np.ndarray) -> list[int]:
    """Column-major run lengths of a 2-D boolean mask, starting with the count of zeros (maybe 0)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], changes, [flat.size])))
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return [int(r) for r in runs]


def runs_to_string(runs: list[int]) -> str:
    """COCO's compressed counts: deltas against the run two back, 5 bits per character, offset 48."""
    out = []
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, as in the C code for negative deltas
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def string_to_runs(counts: str) -> list[int]:
    """Inverse of :func:`runs_to_string`."""
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        x, k, more = 0, 0, True
        while more:
            c = ord(counts[pos]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            pos += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def encode(mask: np.ndarray) -> dict[str, Any]:
    """``{"size": [h, w], "counts": str}`` for a (H, W) boolean mask (``pycocotools.mask.encode`` format)."""
    if mask.ndim != 2:
        raise ValueError(f"Expected a 2-D mask, got shape {mask.shape}")
    h, w = mask.shape
    return {"size": [int(h), int(w)], "counts": runs_to_string(mask_to_runs(mask))}


def _runs(rle: dict[str, Any]) -> list[int]:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return string_to_runs(counts) if isinstance(counts, str) else [int(c) for c in counts]


def decode(rle: dict[str, Any]) -> np.ndarray:
    """The (H, W) boolean mask of a COCO RLE (compressed string or uncompressed list of counts)."""
    h, w = (int(v) for v in rle["size"])
    runs = _runs(rle)
    if sum(runs) != h * w or min(runs, default=0) < 0:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels, expected {h} x {w} = {h * w}")
    values = np.arange(len(runs)) % 2 == 1  # runs alternate 0, 1, 0, ...
    return np.repeat(values, runs).reshape((h, w), order="F")


def area(rle: dict[str, Any]) -> int:
    """Number of foreground pixels, without decoding the mask."""
    return int(sum(_runs(rle)[1::2]))


def encode_labels(labels: np.ndarray, num_classes: int) -> list[dict[str, Any]]:
    """One RLE per class index ``0 .. num_classes - 1`` of an integer label map."""
    return [encode(labels == i) for i in range(num_classes)]
