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


def string_to_runs_array(counts: str | bytes) -> np.ndarray:
    """:func:`string_to_runs` vectorised with numpy (int64), ~5x faster on SA-1B-sized masks, where
    the loop above is the data loader's bottleneck. Raises ``ValueError`` on a malformed string."""
    if isinstance(counts, str):
        if not counts.isascii():
            raise ValueError("malformed RLE counts string (non-ASCII characters)")
        counts = counts.encode("ascii")
    c = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ((c < 0) | (c > 63)).any() or c[-1] & 0x20:
        raise ValueError("malformed RLE counts string (a character outside '0'..'o', or a truncated value)")
    last = np.flatnonzero((c & 0x20) == 0)  # the final character of each value
    first = np.concatenate(([0], last[:-1] + 1))
    length = last - first + 1
    if length.max() > 12:  # 60 bits: far beyond any image's pixel count
        raise ValueError("malformed RLE counts string (a value of more than 12 characters)")
    shift = 5 * (np.arange(c.size) - np.repeat(first, length))
    x = np.add.reduceat((c & 0x1F) << shift, first)
    x -= ((c[last] & 0x10) != 0).astype(np.int64) << (5 * length)  # sign extension of negative deltas
    runs = x.copy()  # from the fourth value on, each is a delta against the run two back
    runs[3::2] = np.cumsum(x[1::2])[1:]
    runs[4::2] = np.cumsum(x[2::2])[1:]
    return runs


def runs_array(rle: dict[str, Any]) -> np.ndarray:
    """int64 run lengths of a COCO RLE (compressed string, bytes or uncompressed list of counts)."""
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        return string_to_runs_array(counts)
    return np.asarray([int(c) for c in counts], dtype=np.int64)


def decode(rle: dict[str, Any]) -> np.ndarray:
    """The (H, W) boolean mask of a COCO RLE (compressed string or uncompressed list of counts)."""
    h, w = (int(v) for v in rle["size"])
    runs = runs_array(rle)
    if int(runs.sum()) != h * w or (runs < 0).any():
        raise ValueError(f"RLE runs cover {int(runs.sum())} pixels, expected {h} x {w} = {h * w}")
    values = np.arange(len(runs)) % 2 == 1  # runs alternate 0, 1, 0, ...
    return np.repeat(values, runs).reshape((h, w), order="F")


def area(rle: dict[str, Any]) -> int:
    """Number of foreground pixels, without decoding the mask."""
    return int(runs_array(rle)[1::2].sum())


def encode_labels(labels: np.ndarray, num_classes: int) -> list[dict[str, Any]]:
    """One RLE per class index ``0 .. num_classes - 1`` of an integer label map."""
    return [encode(labels == i) for i in range(num_classes)]
