"""Segmentation throughput and peak memory per method, batched vs. the official crop-by-crop way.

For each method and protocol, the same images are segmented twice in separate processes (so each
peak-memory figure is its own): "batched" (all windows of all images grouped, ``batch_size`` at a
time, as vocabseg runs them) and "batch 1" (one image at a time, one window at a time, as the
official repositories run them). Both must give the same probabilities; the table prints the
largest difference, images/s of both and their ratio. Methods that cut their windows themselves
(registered ``crop`` 0 with a ``slide_crop`` option: CLIPer, CorrCLIP, Trident) run one image at a
time either way, so their batch-1 columns are n/a; a fixed protocol's crop / stride becomes their
``slide_crop`` / ``slide_stride``. The protocol ``default`` is each method's registered (published)
one. Random weights at real size: ViT-B/16, the methods' VFMs (DINO) and SAM ViT-B (Trident); speed
does not depend on the weights' values. CorrCLIP's SAM 2 masks are replaced by a fixed 4 x 4 grid of
rectangles (:func:`grid_masks`): random SAM 2 weights would be huge and meaningless, so its rows
exclude mask generation.

    python benchmarks/segment_speed.py                       # CPU, training-free methods, both fixed protocols
    python benchmarks/segment_speed.py --methods cliper corrclip --protocols default --images 2
    python benchmarks/segment_speed.py --device cuda --images 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from common import describe_device, peak_rss_mib, reset_peak_rss

from vocabseg.methods import MethodSpec, get_method_spec, list_methods

DEFAULT_PROTOCOL = "default"  # each method's registered settings
PROTOCOLS = {  # name -> (short side, crop, stride)
    "336 / 224 s112": (336, 224, 112),
    "448 / 448 s224": (448, 448, 224),
}
GRID = 4  # grid_masks: GRID x GRID rectangles
PEAK_MEANING = {
    "cpu": "the process's resident-memory high-water mark during the timed segmentation (weights included)",
    "cuda": "torch's peak allocated GPU memory during the timed segmentation (weights included)",
}
CLASSES = "person, car, dog, cat, chair, sofa, tv monitor, table, bottle, plant"
METHODS = list_methods(trainable=False)


def grid_masks(image: np.ndarray) -> np.ndarray:
    """A fixed stand-in mask generator (CorrCLIP's ``masks``): GRID x GRID rectangles covering the image."""
    h, w = image.shape[:2]
    rows, cols = np.linspace(0, h, GRID + 1).astype(int), np.linspace(0, w, GRID + 1).astype(int)
    masks = np.zeros((GRID * GRID, h, w), dtype=bool)
    for i in range(GRID):
        for j in range(GRID):
            masks[i * GRID + j, rows[i] : rows[i + 1], cols[j] : cols[j + 1]] = True
    return masks


def slides_inside(spec: MethodSpec) -> bool:
    """The method cuts its own windows from the whole (resized) image (registered crop 0 + slide_crop)."""
    return spec.defaults.crop == 0 and "slide_crop" in spec.options


def benchmark_options(spec: MethodSpec) -> dict:
    """Method options for random-weight extra models at real size (SAM ViT-B) and the grid masks."""
    options: dict = {}
    if "sam_pretrained" in spec.options:
        options["sam_pretrained"] = None
    if "masks" in spec.options:
        options["masks"] = grid_masks
    return options


def protocol_label(method: str, protocol: str) -> str:
    """The protocol column: short side / window stride, the windows the method cuts itself marked."""
    spec = get_method_spec(method)
    if protocol == DEFAULT_PROTOCOL:
        d = spec.defaults
        short, crop, stride = d.short_side, d.crop, d.stride
        if slides_inside(spec):
            crop, stride = spec.options["slide_crop"], spec.options["slide_stride"]
    else:
        short, crop, stride = PROTOCOLS[protocol]
    window = f"{crop} s{stride}" + (" inside" if slides_inside(spec) else "") if crop else "whole image"
    return f"{short} / {window}" + (" (default)" if protocol == DEFAULT_PROTOCOL else "")


def make_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """VOC-sized test images (500 x 375 and 375 x 500, alternating)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(375, 500, 3) if i % 2 == 0 else (500, 375, 3), dtype=np.uint8) for i in range(n)]


def build_segmenter(method: str, protocol: str, device: str, **settings):
    """A ViT-B/16 Segmenter with random weights at ``protocol`` (``default``: the method's own); PAMR
    off (post-processing at full resolution, timed apart from the dense forward)."""
    from vocabseg import Segmenter

    spec = get_method_spec(method)
    options = benchmark_options(spec)
    if protocol != DEFAULT_PROTOCOL:
        short, crop, stride = PROTOCOLS[protocol]
        if slides_inside(spec):
            options.update(slide_crop=crop, slide_stride=stride)
            crop = 0
        settings.update(short_side=short, crop=crop, stride=stride)
    if spec.trainable:
        settings["weights"] = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Segmenter(
            method=method,
            model="ViT-B-16",
            pretrained=None,
            vfm_pretrained=None,
            device=device,
            text_cache_dir=None,
            method_kwargs=options,
            pamr_steps=0,
            **settings,
        )


def write_table(path: Path | None, title: str, header: str, rows: list[str]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {title}\n\n{header}\n" + "\n".join(rows) + "\n")


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)  # both processes must build the same random weights
    batch_size = 1 if args.mode == "batch1" else args.batch_size
    seg = build_segmenter(args.method, args.protocol, args.device, batch_size=batch_size)
    images = make_images(args.images)
    seg.segment(images[0], CLASSES)  # warm-up, and text encoding outside the timing
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    start = time.perf_counter()
    if args.mode == "batch1":
        results = [seg.segment(img, CLASSES) for img in images]
    else:
        results = seg.segment(images, CLASSES)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    np.save(args.save_probs, np.concatenate([r.probs.ravel() for r in results]))
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else peak_rss_mib()
    print(json.dumps({"images_per_s": args.images / seconds, "peak_mib": peak}))


def run_worker(method: str, protocol: str, mode: str, args: argparse.Namespace, probs_path: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--protocol", protocol, "--mode", mode,
           "--images", str(args.images), "--device", args.device, "--batch-size", str(args.batch_size),
           "--save-probs", probs_path, "--threads", str(args.threads)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{method} {protocol} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=[DEFAULT_PROTOCOL, *PROTOCOLS])
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    # worker-only options
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--protocol", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--save-probs", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    device = describe_device(args.device)
    header = (
        f"ViT-B/16 (random weights; VFMs and SAM ViT-B random too, CorrCLIP on {GRID}x{GRID} grid masks "
        f"instead of SAM 2), {args.images} images of 500x375 / 375x500, 10 classes x 80 templates "
        f"(text encoded before timing), PAMR off, batched = {args.batch_size} windows per forward.\n"
        f"Device: {args.device} — {device}; torch {torch.__version__}.\n"
        f"Peak memory: {PEAK_MEANING['cuda' if args.device.startswith('cuda') else 'cpu']}.\n"
    )
    rows = ["| method | protocol (short / crop stride) | batched img/s | batch-1 img/s | speed-up | "
            "peak MiB batched | peak MiB batch-1 | max prob diff |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    print(header)
    print("\n".join(rows), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for protocol in args.protocols:
            for method in args.methods:
                a, b = f"{tmp}/a.npy", f"{tmp}/b.npy"
                batched = run_worker(method, protocol, "batched", args, a)
                ips, peak = f"{batched['images_per_s']:.2f}", f"{batched['peak_mib']:.0f}"
                if slides_inside(get_method_spec(method)):  # one image at a time either way
                    row = f"| {method} | {protocol_label(method, protocol)} | {ips} | n/a | n/a | {peak} | n/a | n/a |"
                else:
                    single = run_worker(method, protocol, "batch1", args, b)
                    diff = float(np.abs(np.load(a) - np.load(b)).max())
                    row = (
                        f"| {method} | {protocol_label(method, protocol)} | {ips} | {single['images_per_s']:.2f} | "
                        f"{batched['images_per_s'] / single['images_per_s']:.2f}x | {peak} | "
                        f"{single['peak_mib']:.0f} | {diff:.1e} |"
                    )
                rows.append(row)
                print(row, flush=True)
    write_table(args.out, "Segmentation speed", header, rows)


if __name__ == "__main__":
    main()
