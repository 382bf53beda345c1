"""Reading speed of caption shards (``caption_shards``): tar reading, JPEG decoding, DINO multi-crop.

Writes a synthetic img2dataset-style shard set first (webdataset's ``TarWriter``: ``{key}.jpg``,
``{key}.txt``, ``{key}.json``; smooth images with noise, JPEG quality 90, so the files are of a
realistic size), then reads it through the trainer's path (``ShardBatchStream`` over ``CaptionShards``,
whole batches with ``collate_captions``) with 0 and 2 loader workers, and times three stages of one
sample in the main process (tar reading only; + decoding; + the multi-crop of 1 x 224 and 6 x 96
views). Reported: samples/s after one warm-up batch; the stages' milliseconds per sample.

    python benchmarks/webdataset_read.py                       # 8 shards x 128 samples of 384x288
    python benchmarks/webdataset_read.py --workers 0 2 4 --out benchmarks/results/webdataset_read.md
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from common import describe_device
from PIL import Image

from vocabseg.data.captions import CaptionShards, MultiCrop, expand_shards
from vocabseg.io.images import load_image
from vocabseg.train.sampler import ShardBatchStream, StreamProgress


def synthetic_jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
    """A smooth colour field with noise: JPEG sizes like photos' (tens of kB at 384 x 288)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(2 * np.pi * (f * x + g * y) + p) for f, g, p in rng.uniform(0.5, 3, (3, 3))], -1)
    pixels = 127 + 100 * base + rng.normal(0, 12, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: Path, shards: int, per_shard: int, size: tuple[int, int]) -> float:
    """The shard set; returns the mean JPEG size in kB."""
    rng = np.random.default_rng(0)
    jpegs = [synthetic_jpeg(rng, *size) for _ in range(32)]  # reused: encoding is not what is measured
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                sink.write(
                    {
                        "__key__": key,
                        "jpg": jpegs[(s * per_shard + i) % len(jpegs)],
                        "txt": f"a synthetic picture number {i} of shard {s}",
                        "json": {"key": key, "status": "success", "width": size[1], "height": size[0]},
                    }
                )
    return sum(len(j) for j in jpegs) / len(jpegs) / 1024


def read_rate(urls: list[str], crop: MultiCrop, workers: int, batch: int, buffer: int) -> tuple[float, int]:
    """Samples/s of one epoch through the trainer's stream (after the first batch), and the samples."""
    data = CaptionShards(urls, crop, shuffle_buffer=buffer)
    stream = ShardBatchStream(
        data, seed=0, rank=0, world_size=1, batch_size=batch, num_workers=workers, pin_memory=False
    )
    stream.next()  # warm-up: workers started, buffers filled
    start, samples = time.perf_counter(), 0
    while True:
        out = stream.next()
        if stream.epoch != 0:
            break
        samples += len(out["caption"])
    seconds = time.perf_counter() - start
    stream.close()
    return samples / seconds, samples


def stage_costs(urls: list[str], crop: MultiCrop, limit: int) -> dict[str, float]:
    """Milliseconds per sample in the main process: tar reading, + decoding, + multi-crop."""
    data = CaptionShards(urls, crop, shuffle_buffer=0, shuffle_shards=False)
    t0 = time.perf_counter()
    raw = []
    for item in data._raw(range(data.num_shards), StreamProgress()):
        raw.append(item)
        if len(raw) == limit:
            break
    t1 = time.perf_counter()
    images = [load_image(item[2]) for item in raw]
    t2 = time.perf_counter()
    for k, image in enumerate(images):
        crop(image, seed=k)
    t3 = time.perf_counter()
    n = len(raw)
    return {"read": 1e3 * (t1 - t0) / n, "decode": 1e3 * (t2 - t1) / n, "multicrop": 1e3 * (t3 - t2) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--size", type=int, nargs=2, default=[288, 384], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shuffle-buffer", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    crop = MultiCrop()  # 1 x 224 at (0.4, 1) + 6 x 96 at (0.05, 0.4), as ViL-Seg
    with tempfile.TemporaryDirectory() as tmp:
        kb = write_shards(Path(tmp), args.shards, args.per_shard, tuple(args.size))
        urls = expand_shards(tmp)
        stages = stage_costs(urls, crop, limit=min(256, args.shards * args.per_shard))
        print(json.dumps(stages), file=sys.stderr)
        rows = []
        for workers in args.workers:
            rate, samples = read_rate(urls, crop, workers, args.batch_size, args.shuffle_buffer)
            print(json.dumps({"workers": workers, "samples_s": rate, "samples": samples}), file=sys.stderr)
            rows.append(f"| {workers} | {args.batch_size} | {args.shuffle_buffer} | {samples} | {rate:.1f} |")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    text = "\n".join(
        [
            f"### {describe_device('cpu')}, torch {torch.__version__}, {args.threads} main-process thread(s); "
            f"load average before the run ended: {load}",
            "",
            f"{args.shards} shards x {args.per_shard} samples, JPEG {args.size[1]}x{args.size[0]} "
            f"(mean {kb:.0f} kB), multi-crop 1 x 224 + 6 x 96.",
            "",
            f"Stages, one sample in the main process: tar reading {stages['read']:.2f} ms, JPEG decoding "
            f"{stages['decode']:.2f} ms, multi-crop {stages['multicrop']:.2f} ms.",
            "",
            "| loader workers | batch | shuffle buffer | samples timed | samples/s |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
