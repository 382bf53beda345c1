"""Training speed and memory of the registered recipes at real size (their CLIP, random weights).

For each recipe (``--recipes``; default: every registered one), crop size and precision, a separate
process (so that each peak memory is its own) builds the recipe's model with
``vocabseg.train.tasks.build_model`` (``model.pretrained=null``: random weights, real size), calls
``model.prepare_training(clip, dataset)`` with a stand-in dataset that has what the methods read from
it (the training vocabulary: the K class names of the recipe's dataset), builds the recipe's
optimiser (``vocabseg.train.optim.build_optimizer``) and times optimiser steps as the trainer runs
them: forward and loss (``training_step``), backward, gradient clipping where the recipe asks for it,
the optimiser step and ``after_step`` where the model has one (momentum teachers: PixelCLIP, ViL-Seg).
The batch is synthetic and already in memory, in the format the recipe's dataset produces
(:data:`SYNTHETIC_BATCHES`, keyed by ``data.dataset``), so data loading is not measured.

Reported: seconds per step, iterations/s, samples/s, peak memory (CUDA: ``max_memory_allocated``; CPU:
the resident high-water mark of the timed steps, weights and optimiser state included) and the
trainable parameters. A configuration whose warm-up step takes longer than ``--max-step-seconds`` is
reported as not measured, with that time. Mixed precision runs only on CUDA: on CPU a recipe's
``bf16``/``fp16`` runs in float32 (the AMP column says what ran).

    python benchmarks/train_speed.py --recipes beyond_labels_pascal5i --crops 224 448 --batch-size 8
    python benchmarks/train_speed.py --batch-size 1 --steps 2 --warmup 1 --out benchmarks/results/train_speed.md
    python benchmarks/train_speed.py --device cuda --batch-size 8 --amp recipe
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
from common import describe_device, peak_rss_mib, reset_peak_rss

from vocabseg.train import get_recipe, list_recipes
from vocabseg.train.recipe import Recipe

#: a stand-in caption of typical length (CC3M / COCO captions are ~10 words)
CAPTION = "a brown dog running on the grass next to a red ball in a park"
#: masks per sample of the mask batches (SA-1B has ~100 masks per image; a crop holds fewer)
MASKS_PER_SAMPLE = 64


# -- synthetic batches, one home per kind of training data ------------------------------------------------
def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def segmentation_batch(recipe: Recipe, batch: int, classes: int) -> dict[str, Any]:
    """``SegTrainDataset``'s batch: ``image`` (B, 3, S, S) and ``label`` (B, S, S) in 0..K (K: background,
    a negative for every class) with 5 % ignored (255) pixels."""
    g, crop = _generator(), recipe.data.crop
    label = torch.randint(0, classes + 1, (batch, crop, crop), generator=g)
    label[torch.rand(label.shape, generator=g) < 0.05] = 255
    return {"image": torch.randn(batch, 3, crop, crop, generator=g), "label": label}


def mask_batch(recipe: Recipe, batch: int, classes: int) -> dict[str, Any]:
    """``collate_masks``' batch (PixelCLIP): two views (B, 3, S, S), ``masks`` (B, M, R, R) bool, here a
    random partition of the R x R grid into M regions (blocks of 16 x 16 cells), the non-empty ones valid."""
    from vocabseg.data.mask_train import MaskTrainTransforms

    options = {k: v for k, v in recipe.data.options.items() if k in ("mask_resolution", "max_masks")}
    sampling = MaskTrainTransforms(crop=recipe.data.crop, **options)
    g, crop, res = _generator(), recipe.data.crop, sampling.mask_resolution
    count = min(MASKS_PER_SAMPLE, sampling.max_masks)
    blocks = torch.randint(0, count, (batch, -(-res // 16), -(-res // 16)), generator=g)
    regions = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :res, :res]
    masks = regions[:, None] == torch.arange(count)[None, :, None, None]
    image = torch.randn(batch, 3, crop, crop, generator=g)
    return {
        "image": image,
        "teacher_image": image + 0.1 * torch.randn(image.shape, generator=g),
        "masks": masks,
        "mask_valid": masks.flatten(2).sum(-1) > 1,  # as the data keeps them
        "index": torch.arange(batch),
    }


def caption_batch(recipe: Recipe, batch: int, classes: int) -> dict[str, Any]:
    """``collate_captions``' batch (ViL-Seg): the global view (B, 3, G, G), the recipe's local views
    (B, n, 3, L, L) as its multi-crop makes them, and B captions."""
    from vocabseg.data.captions import multicrop_from_options

    crops = multicrop_from_options(recipe.data.options, global_size=recipe.data.crop)
    g, size = _generator(), crops.local_size
    return {
        "image": torch.randn(batch, 3, crops.global_size, crops.global_size, generator=g),
        "local_crops": torch.randn(batch, crops.num_local, 3, size, size, generator=g),
        "caption": [CAPTION] * batch,
    }


def pascal5i_names(recipe: Recipe) -> list[str]:
    """The seen classes of the recipe's fold (the PASCAL-5i training set's vocabulary)."""
    from vocabseg.data.pascal5i import seen_classes
    from vocabseg.data.registry import get_dataset_spec

    fold = int(recipe.data.options.get("fold", 0))
    voc = get_dataset_spec(f"pascal5i-{fold}").classes.names(None, benchmark=f"pascal5i-{fold}")
    return [voc[c - 1] for c in seen_classes(fold)]


def benchmark_names(name: str) -> Callable[[Recipe], list[str]]:
    """Every class of a semantic benchmark (its train split is supervised on all of them)."""

    def names(recipe: Recipe) -> list[str]:
        from vocabseg.data.registry import get_dataset_spec

        return get_dataset_spec(name).classes.names(recipe.data.options.get("classes_file"), benchmark=name)

    return names


class SyntheticData(NamedTuple):
    make: Callable[[Recipe, int, int], dict[str, Any]]  # (recipe, batch size, K) -> a batch
    names: Callable[[Recipe], list[str]] | None  # the training vocabulary (None: the data has no class labels)


#: ``DataConfig.dataset`` -> how to make its batch (a new kind of training data is one entry here)
SYNTHETIC_BATCHES: dict[str, SyntheticData] = {
    "pascal5i": SyntheticData(segmentation_batch, pascal5i_names),
    "coco_stuff": SyntheticData(segmentation_batch, benchmark_names("coco_stuff")),
    "sa1b": SyntheticData(mask_batch, None),
    "dino_masks": SyntheticData(mask_batch, None),
    "caption_csv": SyntheticData(caption_batch, None),
    "coco_captions": SyntheticData(caption_batch, None),
    "caption_shards": SyntheticData(caption_batch, None),
}


def stand_in_dataset(names: list[str] | None) -> SimpleNamespace:
    """What ``prepare_training`` reads from a dataset: its ``vocabulary`` (the real class names: the text
    tower runs on prompts cut to the longest one, so their lengths count; none without labels)."""
    from vocabseg.text.vocabulary import Vocabulary

    return SimpleNamespace(vocabulary=Vocabulary.from_list(names, shared_names=True) if names else None)


# -- one configuration, in its own process --------------------------------------------------------------
def to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_amp(recipe: Recipe, amp: str, device: str) -> str:
    """The precision that runs: ``recipe``: the recipe's on CUDA, float32 elsewhere (vocabseg refuses AMP off CUDA)."""
    if amp == "recipe":
        return recipe.amp if device.startswith("cuda") else "none"
    return amp


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from vocabseg.train.optim import autocast, build_optimizer
    from vocabseg.train.tasks import build_model

    device = args.device
    base = get_recipe(args.recipe)
    overrides = ["model.pretrained=null", f"batch_size={args.batch_size}"]
    if args.crop:
        overrides.append(f"data.crop={args.crop}")
    amp = run_amp(base, args.config_amp, device)
    recipe = base.with_overrides([*overrides, f"amp={json.dumps(amp)}"])
    data = SYNTHETIC_BATCHES[recipe.data.dataset]
    names = data.names(recipe) if data.names else None
    classes = len(names) if names else None
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weights warnings
        model, clip = build_model(recipe, device)
        model.prepare_training(clip, stand_in_dataset(names))
        optimizer = build_optimizer(model, recipe.optim)
    batch = to_device(data.make(recipe, recipe.batch_size, classes or 0), device)
    params = [p for p in model.parameters() if p.requires_grad]
    after_step = getattr(model, "after_step", None)

    def step(n: int) -> float:
        start = time.perf_counter()
        with autocast(amp, device):
            loss = model.training_step(batch)["loss"]
        loss.backward()
        if recipe.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, recipe.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            with torch.no_grad():
                after_step(n)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    result = {
        "recipe": recipe.name,
        "clip": recipe.model.clip_model,
        "crop": recipe.data.crop,
        "batch": recipe.batch_size,
        "amp": amp,
        "classes": classes,
        "trainable_m": sum(p.numel() for p in params) / 1e6,
    }
    warm = [step(i + 1) for i in range(args.warmup)]  # allocator, kernels, optimiser state
    if warm and max(warm) > args.max_step_seconds:
        return {**result, "skipped": f"a warm-up step took {max(warm):.0f} s (> {args.max_step_seconds:.0f} s)"}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    seconds = sum(step(args.warmup + i + 1) for i in range(args.steps))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else peak_rss_mib()
    return {
        **result,
        "s_step": seconds / args.steps,
        "it_s": args.steps / seconds,
        "samples_s": args.steps * recipe.batch_size / seconds,
        "peak_mib": peak,
        "load": os.getloadavg()[0],
    }


def run_worker(recipe: str, crop: int | None, amp: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--recipe", recipe, "--crop", str(crop or 0), "--config-amp", amp,
           "--device", args.device, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--max-step-seconds", str(args.max_step_seconds),
           "--threads", str(args.threads)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{recipe} (crop {crop}, amp {amp}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table_row(r: dict[str, Any]) -> str:
    head = f"| {r['recipe']} | {r['clip']} | {r['crop']} | {r['batch']} | {r['amp']} | {r['classes'] or '-'} |"
    if "skipped" in r:
        return f"{head} not measured: {r['skipped']} | | | | {r['trainable_m']:.1f} | |"
    return (
        f"{head} {r['s_step']:.2f} | {r['it_s']:.3f} | {r['samples_s']:.2f} | {r['peak_mib']:.0f} | "
        f"{r['trainable_m']:.1f} | {r['load']:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list_recipes(), choices=list_recipes(), metavar="NAME")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--crops", type=int, nargs="+", default=[0], help="crop sizes (0: the recipe's data.crop)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--amp", nargs="+", default=["recipe"], help="none, bf16, fp16 (CUDA only), recipe")
    parser.add_argument("--max-step-seconds", type=float, default=180.0, help="skip a recipe whose warm-up is slower")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--crop", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--config-amp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(args)))
        return

    missing = sorted({get_recipe(r).data.dataset for r in args.recipes} - set(SYNTHETIC_BATCHES))
    if missing:
        parser.error(f"no synthetic batch for training data {missing}: add an entry to SYNTHETIC_BATCHES")
    load_start = os.getloadavg()
    header = [
        f"### Training steps, random weights at real size, {args.device}: {describe_device(args.device)}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} timed steps after "
        f"{args.warmup} warm-up",
        "",
        "| recipe | CLIP | crop | batch | AMP | K | s/step | iterations/s | samples/s | peak memory (MiB) "
        "| trainable params (M) | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows = []
    for amp in args.amp:
        for crop in args.crops:
            for recipe in args.recipes:
                r = run_worker(recipe, crop, amp, args)
                print(json.dumps(r), file=sys.stderr)
                rows.append(table_row(r))
                print(rows[-1], flush=True)
    load_end = os.getloadavg()
    footer = [
        "",
        f"Load average (1 / 5 / 15 min) at the start: {' / '.join(f'{x:.1f}' for x in load_start)}; "
        f"at the end: {' / '.join(f'{x:.1f}' for x in load_end)} (the machine is shared with other jobs).",
        "",
    ]
    text = "\n".join(header + rows + footer)
    print("\n".join(footer))
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
