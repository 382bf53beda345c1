"""COCO run-length-encoded masks, decoded in numpy (no pycocotools needed).

A mask of size (h, w) is flattened in column-major order and stored as alternating run lengths of
0s and 1s, starting with 0s. The compressed form (pycocotools ``rleToString``) writes each count as
5-bit groups in ASCII (offset 48), bit 0x20 = "more groups follow", bit 0x10 of the last group =
sign; from the third count on, the difference to the count two places before is stored.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def decode_counts(text: str | bytes) -> list[int]:
    """Compressed RLE string -> run lengths."""
    data = text.decode("ascii") if isinstance(text, bytes) else text
    counts: list[int] = []
    p = 0
    while p < len(data):
        value, shift, more = 0, 0, True
        while more:
            c = ord(data[p]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """``{"size": [h, w], "counts": str | list[int]}`` -> (h, w) uint8 mask of 0/1."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = decode_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if sum(runs) != h * w or any(r < 0 for r in runs):
        raise ValueError(f"RLE run lengths sum to {sum(runs)}, expected {h}x{w} = {h * w}")
    flat = np.repeat((np.arange(len(runs)) % 2).astype(np.uint8), runs)
    return flat.reshape(w, h).T
