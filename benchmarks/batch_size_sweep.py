"""Throughput against the number of windows per forward pass, all measured in one process.

``segment_speed.py`` runs batched and batch-1 in separate processes (so that each has its own peak
memory); on a shared CPU the run-to-run noise between processes is as large as the effect. Here one
Segmenter segments the same images at every batch size in turn, ``--repeats`` rounds interleaved,
and the table gives the best and the median images/s of each. Random ViT-B/16 weights.

    python benchmarks/batch_size_sweep.py --methods sclip --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import describe_device
from segment_speed import CLASSES, PROTOCOLS, build_segmenter, make_images, write_table


def sweep(method: str, protocol: str, args: argparse.Namespace) -> dict[int, list[float]]:
    """images/s per batch size, one entry per round."""
    import torch

    torch.manual_seed(0)
    seg = build_segmenter(method, protocol, args.device)
    images = make_images(args.images)
    seg.segment(images[0], CLASSES)  # warm-up, and text encoding outside the timing
    speeds: dict[int, list[float]] = {size: [] for size in args.batch_sizes}
    for _ in range(args.repeats):
        for size in args.batch_sizes:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            if size == 1:  # the official way: one image, one window at a time
                for image in images:
                    seg.segment(image, CLASSES, batch_size=1)
            else:
                seg.segment(images, CLASSES, batch_size=size)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            speeds[size].append(len(images) / (time.perf_counter() - start))
    return speeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["sclip"])
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    args = p.parse_args()

    import torch

    device = describe_device(args.device)
    header = (
        f"ViT-B/16 (random weights), {args.images} images of 500x375 / 375x500, 10 classes x 80 templates, "
        f"PAMR off; {args.repeats} interleaved rounds in one process; batch 1 = one image and one window "
        f"at a time.\nDevice: {args.device} — {device}; torch {torch.__version__}.\n"
    )
    rows = ["| method | protocol | windows per forward | best img/s | median img/s |", "|---|---|---|---|---|"]
    print(header)
    print("\n".join(rows), flush=True)
    for protocol in args.protocols:
        for method in args.methods:
            for size, values in sweep(method, protocol, args).items():
                row = f"| {method} | {protocol} | {size} | {max(values):.2f} | {statistics.median(values):.2f} |"
                rows.append(row)
                print(row, flush=True)
    write_table(args.out, "Windows per forward pass", header, rows)


if __name__ == "__main__":
    main()
