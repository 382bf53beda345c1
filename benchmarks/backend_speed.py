"""Images/s per method and inference backend at the standard protocol, side by side in one process.

For each method one Segmenter (random ViT-B/16 weights, random DINO ViT-B/8 for ProxyCLIP: speed
does not depend on the weights' values) segments the same VOC-sized images in turn with:

* **torch batch-1**: one image, one window at a time, as the official repositories run them (the baseline);
* **torch**: vocabseg's batched windows;
* **onnxruntime f32**, **openvino f32**, **openvino native** (bf16 where the CPU has it): the method's
  image side swapped with :func:`vocabseg.backends.wrap_method`, at the same batch size.

Exports and compilation happen in an untimed warm-up (exports are cached in ``--cache``). Rows run
interleaved, ``--repeats`` rounds; the table gives the best and median images/s, the speed-up of the
best over batch-1 and over torch, and for every row the share of pixels whose label equals torch
f32's, with the largest difference of class probabilities. PAMR off (it runs after the backend).

    python benchmarks/backend_speed.py                      # every training-free method, 4 images
    python benchmarks/backend_speed.py --quick              # sclip, 1 image, 1 round: a smoke test
    python benchmarks/backend_speed.py --out benchmarks/results/backend_speed.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import describe_device
from segment_speed import CLASSES, PROTOCOLS, build_segmenter, make_images, write_table

#: (row label, backend, precision); the first row is the reference of the agreement columns
BACKENDS = [
    ("torch", "torch", "f32"),
    ("onnxruntime f32", "onnxruntime", "f32"),
    ("openvino f32", "openvino", "f32"),
    ("openvino native", "openvino", "native"),
]
BASELINE = "torch batch-1"


def run_method(method: str, args: argparse.Namespace, cache: str) -> list[str]:
    import torch

    from vocabseg.backends import wrap_method

    torch.manual_seed(0)
    seg = build_segmenter(method, args.protocol, "cpu")
    batch = args.batch_size or seg.config.batch_size
    own = seg.runner
    variants = {BASELINE: own, **{label: wrap_method(own, b, p, cache_dir=cache) for label, b, p in BACKENDS}}
    images = make_images(args.images)

    def segment(label: str):
        seg.runner = variants[label]
        if label == BASELINE:  # the official way: one image, one window at a time
            return [seg.segment(image, CLASSES, batch_size=1) for image in images]
        return seg.segment(images, CLASSES, batch_size=batch)

    for label in variants:  # warm-up: text encoding, exports, compilation, first allocations
        seg.runner = variants[label]
        seg.segment(images[0], CLASSES, batch_size=batch)
    speeds: dict[str, list[float]] = {label: [] for label in variants}
    results = {}
    for _ in range(args.repeats):
        for label in variants:
            start = time.perf_counter()
            results[label] = segment(label)
            speeds[label].append(len(images) / (time.perf_counter() - start))
    seg.runner = own

    reference = results[BACKENDS[0][0]]
    rows = []
    for label in variants:
        same = [np.mean(r.labels == ref.labels) for r, ref in zip(results[label], reference)]
        diff = max(float(np.abs(r.probs - ref.probs).max()) for r, ref in zip(results[label], reference))
        best, median = max(speeds[label]), statistics.median(speeds[label])
        precision = sorted(getattr(variants[label], "precisions", {"f32"}))
        rows.append(
            f"| {method} | {label} | {'/'.join(precision)} | {best:.2f} | {median:.2f} | "
            f"{best / max(speeds[BASELINE]):.2f}x | {best / max(speeds['torch']):.2f}x | "
            f"{100 * float(np.mean(same)):.2f} % | {diff:.1e} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=None, help="default: every training-free method")
    p.add_argument("--protocol", default="336 / 224 s112", choices=list(PROTOCOLS))
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=0, help="windows per forward (0: the Segmenter's default)")
    p.add_argument("--threads", type=int, default=0, help="torch and runtime threads (0: torch's default)")
    p.add_argument("--cache", default=None, help="export cache folder (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="sclip, 1 image, 1 round: check that everything runs")
    p.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    args = p.parse_args()
    if args.quick:
        args.methods, args.images, args.repeats = args.methods or ["sclip"], 1, 1

    import torch

    from vocabseg.methods import list_methods

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods or list_methods(trainable=False)
    header = (
        f"ViT-B/16 (random weights; DINO ViT-B/8 for proxyclip), {args.images} image(s) of 500x375 / 375x500, "
        f"protocol {args.protocol} (short side / window stride), 10 classes x 80 templates (text encoded before "
        f"timing), PAMR off, best / median of {args.repeats} interleaved round(s). Exports and compilation "
        f"before timing. Agreement and prob diff: against the torch row (f32).\n"
        f"Device: cpu — {describe_device('cpu')}; torch {torch.__version__}, {torch.get_num_threads()} threads.\n"
    )
    rows = [
        "| method | backend | computes in | best img/s | median img/s | vs batch-1 | vs torch | "
        "label agreement | max prob diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print(header)
    print("\n".join(rows), flush=True)
    with tempfile.TemporaryDirectory(prefix="vocabseg-backend-speed-") as scratch:
        for method in methods:
            rows += run_method(method, args, args.cache or scratch)
    write_table(args.out, "Inference backends", header, rows)


if __name__ == "__main__":
    main()
