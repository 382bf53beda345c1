"""Training speed and memory of the Beyond-Labels recipe at real size (CLIP ViT-B/16, random weights).

For each crop size (224 and 448 by default) and device, one process builds the recipe's model with
``vocabseg.train.tasks.build_model``, the recipe's optimiser with ``vocabseg.train.optim``, and times
optimiser steps (forward through the frozen CLIP and the head, BCE loss, backward, AdamW step) on
random batches already in memory, so data loading is not measured. Reported: iterations/s,
samples/s and peak memory (CUDA: ``max_memory_allocated``; CPU: the resident high-water mark of the
timed steps) and the share of a step spent in the frozen CLIP forward. The configurations run side
by side in one process, one after another.

    python benchmarks/train_speed.py                              # CPU, batch 8
    python benchmarks/train_speed.py --device cuda --batch-size 32 --amp none bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from common import describe_device, peak_rss_mib, reset_peak_rss

from vocabseg.train import get_recipe
from vocabseg.train.optim import autocast, build_optimizer
from vocabseg.train.tasks import build_model

RECIPE = "beyond_labels_pascal5i"


def measure(crop: int, batch: int, steps: int, amp: str, device: str) -> dict:
    recipe = get_recipe(RECIPE).with_overrides(
        ["model.pretrained=null", f"data.crop={crop}", f"batch_size={batch}", f"amp={json.dumps(amp)}"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, clip = build_model(recipe, device)
    dim = model.head.text_proj[1].in_features
    model.set_class_text(F.normalize(torch.randn(15, dim), dim=-1).to(device))
    optimizer = build_optimizer(model, recipe.optim)
    gen = torch.Generator().manual_seed(0)
    batch_data = {
        "image": torch.randn(batch, 3, crop, crop, generator=gen).to(device),
        "label": torch.randint(0, 16, (batch, crop, crop), generator=gen).to(device),
    }

    def step() -> float:
        with autocast(amp, device):
            loss = model.training_step(batch_data)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(2):  # warm-up: allocator, kernels, AdamW state
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else peak_rss_mib()
    start = time.perf_counter()  # the frozen CLIP forward alone (what caching CLIP features would save)
    with torch.no_grad(), autocast(amp, device):
        for _ in range(steps):
            model.visual_tokens(batch_data["image"])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    clip_share = (time.perf_counter() - start) / seconds
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "crop": crop,
        "batch": batch,
        "amp": amp,
        "it_s": steps / seconds,
        "samples_s": steps * batch / seconds,
        "peak_mib": peak,
        "clip_share": clip_share,
        "trainable_m": trainable / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--crops", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--amp", nargs="+", default=["none"], help="none, bf16, fp16 (CUDA only)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for amp in args.amp:
        for crop in args.crops:
            r = measure(crop, args.batch_size, args.steps, amp, args.device)
            print(json.dumps(r), file=sys.stderr)
            rows.append(
                f"| {r['crop']} | {r['batch']} | {r['amp']} | {r['it_s']:.3f} | {r['samples_s']:.2f} | "
                f"{r['peak_mib']:.0f} | {100 * r['clip_share']:.0f}% | {r['trainable_m']:.1f} |"
            )
    machine = describe_device(args.device)
    table = [
        f"### {RECIPE}, ViT-B/16 (random weights), {args.device}: {machine}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.steps} timed steps after 2 warm-up",
        "",
        "| crop | batch | AMP | iterations/s | samples/s | peak memory (MiB) | frozen CLIP forward "
        "| trainable params (M) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    text = "\n".join(table)
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
