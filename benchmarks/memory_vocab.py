"""Peak memory of one image with an ADE-847-sized vocabulary, with and without ``return_probs``.

With ``return_probs=True`` the logits of all 847 names are brought to the image's size and turned into
(C, H, W) probabilities; with ``False`` the labels and each pixel's score come from a few names at a
time (``vocabseg.inference.postprocess.stream_labels``). Each mode runs in its own process, so that each
peak is its own. The text side is fed directly: 847 random unit embeddings stand in for the encoded
prompts (encoding 847 x 80 prompts is another benchmark's subject). Random ViT-B/16 weights: memory
and labels' agreement do not depend on the weights' values.

    python benchmarks/memory_vocab.py --out benchmarks/results/memory_vocab.md
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

NUM_NAMES = 847  # ADE20K-Full
MODES = {"probs": True, "labels only": False}


class FixedText:
    """Stands in for the Segmenter's text encoder: name ``class i`` -> random unit vector ``i``."""

    def __init__(self, dim: int, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.functional.normalize(torch.randn(NUM_NAMES, dim, generator=g), dim=-1)

    def encode(self, names, per_template: bool = False):
        return self.table[[int(n.removeprefix("class ")) for n in names]]


def worker(args: argparse.Namespace) -> None:
    import torch

    from vocabseg import Segmenter

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = Segmenter(
            method=args.method, model="ViT-B-16", pretrained=None, text_cache_dir=None, batch_size=args.batch_size
        )
    seg.text_encoder = FixedText(seg.clip.model.text_projection.shape[1])
    names = [f"class {i}" for i in range(NUM_NAMES)]
    h, w = args.size
    image = np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    seg.segment(image[:64, :64], names, return_probs=MODES[args.mode])  # warm-up at a tiny size
    reset_peak_rss()
    start_mib = peak_rss_mib()
    start = time.perf_counter()
    result = seg.segment(image, names, return_probs=MODES[args.mode])
    seconds = time.perf_counter() - start
    np.save(args.save_labels, result.labels)
    stats = {"peak_mib": peak_rss_mib(), "start_mib": start_mib, "seconds": seconds}
    print(json.dumps({**stats, "batch_size": result.info["settings"]["batch_size"]}))


def run_worker(mode: str, batch_size: int, args: argparse.Namespace, labels_path: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--method", args.method, "--batch-size",
           str(batch_size), "--size", *map(str, args.size), "--save-labels", labels_path]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="sclip")
    p.add_argument("--size", nargs=2, type=int, default=[512, 683], metavar=("H", "W"))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[0, 1], help="windows per forward pass (0: by device)")
    p.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--save-labels", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    h, w = args.size
    header = (
        f"{args.method}, ViT-B/16 (random weights) at its defaults (short side 336, 224-px windows, stride "
        f"112), one {h}x{w} image, {NUM_NAMES} names (random unit text embeddings), PAMR off.\n"
        f"Device: cpu — {describe_device('cpu')}; torch {torch.__version__}.\n"
        "Peak: the process's resident-memory high-water mark during the segmentation (weights included); "
        "above start: the peak minus the resident memory when the segmentation began.\n"
    )
    rows = [
        "| return_probs | windows per forward | peak MiB | above start MiB | seconds | labels equal to probs' |",
        "|---|---|---|---|---|---|",
    ]
    print(header)
    print("\n".join(rows), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for batch_size in args.batch_sizes:
            for mode in MODES:
                r = run_worker(mode, batch_size, args, f"{tmp}/{mode}.npy")
                same = float((np.load(f"{tmp}/{mode}.npy") == np.load(f"{tmp}/probs.npy")).mean())
                row = (
                    f"| {MODES[mode]} ({mode}) | {r['batch_size']} | {r['peak_mib']:.0f} | "
                    f"{r['peak_mib'] - r['start_mib']:.0f} | {r['seconds']:.1f} | {100 * same:.2f} % |"
                )
                rows.append(row)
                print(row, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Peak memory with a large vocabulary\n\n" + header + "\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
