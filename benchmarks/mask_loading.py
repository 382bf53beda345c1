"""SA-1B mask loading speed: what PixelCLIP's data loader spends per training sample.

Writes synthetic SA-1B-style pairs (``sa_<id>.jpg`` + ``sa_<id>.json`` with COCO-RLE masks) at SA-1B's
stored size (1500 x 2250) and at PixelCLIP's prepared size (halved: 750 x 1125), ~100 masks per image
whose sizes spread from a few pixels to a third of the image (log-uniform radii, wavy outlines; the
mean RLE string length is printed), then measures in one process with one torch thread
(as a DataLoader worker runs):

* **masks/s**, three ways of getting one image's masks at the training crop (resize to 889 x 1333,
  640 crop, 256 x 256 mask grid):
  - ``official-style``: what the official mapper does per mask: decode the whole mask (pycocotools),
    resize it with PIL nearest to the resized image, crop, then torch nearest to 256 x 256;
  - ``decode whole``: ``vocabseg.io.rle.decode`` of every whole mask (no resize), for scale;
  - ``vocabseg``: ``RLEMasks.sample`` at the crop's grid (only the crop's columns are decoded);
* **samples/s** of ``MaskTrainDataset[(index, seed)]`` with the official transforms (640 crop,
  strong + weak views, 256 masks), and where its time goes (json, image, masks, augmentation).

    cd benchmarks && python mask_loading.py                 # 6 images of each size, ~100 masks each
    cd benchmarks && python mask_loading.py --images 12 --masks 150
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vocabseg.data.mask_train import MaskTrainDataset, MaskTrainTransforms
from vocabseg.data.sa1b import SA1BMasks
from vocabseg.io import rle

RAW = (1500, 2250)
PREPARED = (750, 1125)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One mask: a wavy blob, radius log-uniform from 0.4 % to 35 % of the short side, some with a hole."""
    mask = np.zeros((h, w), dtype=bool)
    r = min(h, w) * float(np.exp(rng.uniform(np.log(0.004), np.log(0.35))))
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    y0, y1 = int(max(0, cy - 1.6 * r)), int(min(h, cy + 1.6 * r + 1))
    x0, x1 = int(max(0, cx - 1.6 * r)), int(min(w, cx + 1.6 * r + 1))
    yy, xx = np.mgrid[y0:y1, x0:x1]
    angle = np.arctan2(yy - cy, xx - cx)
    k1, k2 = rng.integers(2, 7), rng.integers(7, 25)
    radius = r * (1 + 0.3 * np.sin(k1 * angle + rng.uniform(0, 6)) + 0.08 * np.sin(k2 * angle + rng.uniform(0, 6)))
    dist = np.hypot(yy - cy, xx - cx)
    region = dist < radius
    if rng.random() < 0.3:
        region &= dist > 0.3 * radius
    mask[y0:y1, x0:x1] = region
    return mask


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A JPEG-realistic image: smooth colour fields plus texture."""
    low = rng.integers(0, 255, (h // 50 + 2, w // 50 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC)).astype(np.int16)
    return np.clip(smooth + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def write_pairs(folder: Path, size: tuple[int, int], images: int, masks: int, seed: int) -> float:
    """``images`` SA-1B-style pairs in ``folder``; returns the mean RLE string length."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lengths = []
    for i in range(images):
        h, w = size
        Image.fromarray(photo(rng, h, w)).save(folder / f"sa_{i}.jpg", quality=90)
        annotations = []
        for j in range(int(rng.integers(masks * 3 // 4, masks * 5 // 4 + 1))):
            m = blob(rng, h, w)
            enc = rle.encode(m)
            lengths.append(len(enc["counts"]))
            annotations.append({"id": j, "segmentation": enc, "area": int(m.sum()), "bbox": [0, 0, 0, 0]})
        record = {"image": {"image_id": i, "file_name": f"sa_{i}.jpg", "height": h, "width": w}}
        (folder / f"sa_{i}.json").write_text(json.dumps({**record, "annotations": annotations}))
    return float(np.mean(lengths))


def official_style(masks, g, stored: tuple[int, int], image_hw: tuple[int, int], res: int) -> int:
    """The official mapper's per-mask work: whole decode, PIL nearest resize, crop, torch nearest."""
    from pycocotools import mask as coco

    n = 0
    for r in masks.rles:
        whole = coco.decode({"size": r["size"], "counts": r["counts"].encode()})
        if stored != image_hw:  # the official data is prepared at the image's size
            whole = np.asarray(Image.fromarray(whole).resize((image_hw[1], image_hw[0]), Image.NEAREST))
        resized = np.asarray(Image.fromarray(whole).resize((g.width, g.height), Image.NEAREST))
        crop = resized[g.top : g.top + g.crop_height, g.left : g.left + g.crop_width]
        F.interpolate(torch.from_numpy(crop.copy())[None, None].float(), size=(res, res), mode="nearest")
        n += 1
    return n


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_size(root: Path, label: str, size: tuple[int, int], args: argparse.Namespace) -> list[str]:
    folder = root / label
    chars = write_pairs(folder, size, args.images, args.masks, seed=size[0])
    data = SA1BMasks(folder)  # images downscaled to 750 per sample when stored larger (PixelCLIP's halving)
    transforms = MaskTrainTransforms()  # the official 640 crop, 1024 short side (capped at 1333), 256 masks
    dataset = MaskTrainDataset(data, transforms)
    rows = []
    total_masks = sum(len(data.masks(i)) for i in range(len(data)))
    per_image = total_masks / len(data)

    def geometry(i: int):
        image_hw = data.image(i).shape[:2]
        torch.manual_seed(i)
        return image_hw, transforms.draw_geometry(*image_hw)

    geos = [geometry(i) for i in range(len(data))]
    loaded = [data.masks(i) for i in range(len(data))]

    def ours():
        for (image_hw, g), masks in zip(geos, loaded):
            rows_, cols_ = transforms.mask_grid(g, image_hw, masks.shape)
            masks.sample(rows_, cols_)

    def whole():
        for masks in loaded:
            for r in masks.rles:
                rle.decode(r)

    timings = {"vocabseg (crop grid)": timed(ours, args.repeat), "decode whole (vocabseg.io.rle)": timed(whole, 1)}
    try:
        import pycocotools  # noqa: F401

        timings["official-style"] = timed(
            lambda: [official_style(m, g, m.shape, hw, 256) for (hw, g), m in zip(geos, loaded)], 1
        )
    except ImportError:
        pass
    base = timings.get("official-style")
    for name, seconds in timings.items():
        speed = f"{base / seconds:.1f}x" if base else "-"
        rows.append(f"| {label} {size[0]}x{size[1]} | masks: {name} | {total_masks / seconds:,.0f} masks/s | {speed} |")

    parts = {"json": 0.0, "image": 0.0, "masks": 0.0, "augment": 0.0}
    start = time.perf_counter()
    for rep in range(args.repeat):
        for i in range(len(data)):
            dataset[(i, rep * 1000 + i)]
    seconds = (time.perf_counter() - start) / args.repeat
    for i in range(len(data)):  # the same work, step by step, for the breakdown
        t0 = time.perf_counter()
        masks = data.masks(i)
        t1 = time.perf_counter()
        image = data.image(i)
        t2 = time.perf_counter()
        torch.manual_seed(i)
        g = transforms.draw_geometry(*image.shape[:2])
        r, c = transforms.mask_grid(g, image.shape[:2], masks.shape)
        masks.sample(r, c)
        t3 = time.perf_counter()
        transforms(image, masks)
        t4 = time.perf_counter()
        parts["json"] += t1 - t0
        parts["image"] += t2 - t1
        parts["masks"] += t3 - t2
        parts["augment"] += (t4 - t3) - (t3 - t2)  # the transforms' own time, masks excluded
    total = sum(parts.values())
    share = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in parts.items())
    rows.append(
        f"| {label} {size[0]}x{size[1]} | samples: MaskTrainDataset | {len(data) / seconds:.2f} samples/s "
        f"({1000 * seconds / len(data):.0f} ms each) | {share} |"
    )
    print(f"{label}: {per_image:.0f} masks per image, mean RLE string {chars:.0f} characters", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=6, help="images per size")
    parser.add_argument("--masks", type=int, default=100, help="mean masks per image")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions (the best is kept)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, size in (("prepared", PREPARED), ("raw", RAW)):
            rows += bench_size(Path(tmp), label, size, args)
    load_after = os.getloadavg()
    machine = f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"
    print(f"\nCPU: {machine}, 1 thread; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"{args.images} images per size, ~{args.masks} masks each\n")
    print("| stored size | what | speed | vs official-style / time split |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
