"""``vocabseg eval --benchmark voc21 --data-root DIR --method proxyclip [--protocol paper|unified]``."""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DatasetLayoutError, VocabsegError
from .common import (
    add_model_options,
    method_options_from_args,
    run_distributed,
    segmenter_from_args,
    settings_from_args,
)

if TYPE_CHECKING:
    from ..data.dataset import SegDataset
    from ..segmenter import Segmenter

BENCHMARK_GROUPS = {
    "all": "the 8 standard training-free benchmarks",
    "pascal5i": "the 4 PASCAL-5i folds",
    "catseg": "the 6 benchmarks of CAT-Seg's table: A-847, PC-459, A-150, PC-59, PAS-20, PAS-20b",
}
# command-line flag -> dataset-builder keyword
DATASET_OPTIONS = {
    "classes_file": "--classes-file",
    "classes_subset": "--classes-subset",
    "ignore_index": "--ignore-index",
    "reduce_zero_label": "--reduce-zero-label",
    "background_index": "--background-index",
    "episodes": "--episodes",
    "pairs_file": "--pairs-file",
}


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, not {text!r}") from None
    if not 0 <= value < 2**63:  # within torch.manual_seed's range
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**63 - 1, not {text}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..data.pascal5i import EPISODE_POLICIES
    from ..eval.metrics import CONVENTIONS
    from ..eval.protocols import PROTOCOLS

    p = sub.add_parser(
        "eval",
        description="Evaluate on the community's benchmarks under a stated protocol. Writes OUT/<benchmark>/"
        "<method>-<run id>/ (result.json, result.md with per-class IoU, per-image records that make an "
        "interrupted run resume) and OUT/summary.md (method x benchmark). Runs sharded under torchrun.",
        epilog="Example: vocabseg eval -b all --data-root data/ --method sclip --protocol paper. "
        "Trained per PASCAL-5i fold: -b pascal5i --method beyond_labels --weights 'runs/bl-f{fold}/checkpoint-best'. "
        "Run `vocabseg eval --list` for the benchmarks and the layouts they expect.",
    )
    p.add_argument("--benchmark", "-b", help="a benchmark, a comma-separated list, 'all', 'pascal5i' or 'catseg'")
    p.add_argument("--data-root", type=Path, help="the dataset folder, or a folder holding the standard ones")
    p.add_argument("--protocol", default="paper", choices=list(PROTOCOLS), help="settings per benchmark")
    p.add_argument(
        "--convention",
        default=None,
        choices=list(CONVENTIONS),
        help="headline metric convention (default: the protocol's: with --protocol paper, the one the method "
        "published with, detectron2 for CAT-Seg / FGAseg; else mmseg)",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples of each split")
    p.add_argument("--out", "-o", type=Path, default=Path("results"), help="output folder (default: results/)")
    p.add_argument("--save-predictions", action="store_true", help="write each prediction as a palette PNG")
    p.add_argument("--images-per-batch", type=int, default=2, help="images whose windows share forward passes")
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed of every random initialisation (--pretrained none, --weights none, --vfm-pretrained none), "
        "so a rerun draws the same weights and resumes (default: 0)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    d = p.add_argument_group("dataset options")
    d.add_argument("--classes-file", type=Path, default=None, help="class names, one class per line in label order")
    d.add_argument("--classes-subset", default=None, metavar="NAME",
                   help="score only a named subset of the classes, all still predicted (vilseg-unseen: the "
                   "zero-shot unseen classes of voc20, context59, coco_stuff)")  # fmt: skip
    d.add_argument("--ignore-index", type=int, default=None, help="folder: label value not scored (default 255)")
    d.add_argument("--reduce-zero-label", action="store_true", default=None, help="folder: label 0 is ignored")
    d.add_argument("--background-index", type=int, default=None, help="folder: the background class")
    d.add_argument("--episodes", default=None, choices=list(EPISODE_POLICIES), help="PASCAL-5i episode policy")
    d.add_argument("--pairs-file", type=Path, default=None, help="PASCAL-5i: an HSNet-style fold list")
    add_model_options(p)
    p.set_defaults(run=run)


def expand_benchmarks(text: str) -> list[str]:
    """``all`` / ``pascal5i`` / ``voc21,ade150`` -> benchmark names (checked)."""
    from ..data import STANDARD_BENCHMARKS, get_dataset_spec
    from ..data.pascal5i import NUM_FOLDS
    from ..data.registry import CATSEG_BENCHMARKS

    groups = {
        "all": list(STANDARD_BENCHMARKS),
        "pascal5i": [f"pascal5i-{i}" for i in range(NUM_FOLDS)],
        "catseg": list(CATSEG_BENCHMARKS),
    }
    names: list[str] = []
    for part in (x.strip() for x in text.split(",") if x.strip()):
        for name in groups.get(part, [part]):
            get_dataset_spec(name)  # unknown names fail here, with suggestions
            names.append(name)
    return list(dict.fromkeys(names))


def _dataset_options(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, Any]]:
    """Per benchmark, the dataset options given on the command line that its builder takes."""
    from ..data.registry import dataset_options

    given = {k: getattr(args, k) for k in DATASET_OPTIONS if getattr(args, k) is not None}
    per_name = {}
    for name in names:
        accepted = dataset_options(name)
        per_name[name] = {k: v for k, v in given.items() if k in accepted}
    unused = [DATASET_OPTIONS[k] for k in given if not any(k in opts for opts in per_name.values())]
    if unused:
        raise VocabsegError(f"{', '.join(unused)} does not apply to {', '.join(names)}.")
    return per_name


def list_benchmarks() -> None:
    from ..data.registry import DATASETS

    for name, spec in DATASETS.items():
        required = ", ".join(p for p, _ in spec.layout.required())
        size = f"{spec.num_images} images" if spec.num_images else "any size"
        classes = spec.classes.num_classes or "user"
        print(f"{name:12s} {spec.description} [{classes} classes, {size}]")
        under = " or ".join(["DIR", *(f"DIR/{d}" for d in spec.layout.subdirs)])
        print(f"{'':12s}   expects {required} under {under}")
    print("\ngroups: " + "; ".join(f"{k} = {v}" for k, v in BENCHMARK_GROUPS.items()))


def run(args: argparse.Namespace) -> int:
    if args.list:
        list_benchmarks()
        return 0
    if not args.benchmark or args.data_root is None:
        raise VocabsegError("give --benchmark and --data-root (or --list to see the benchmarks).")
    names = expand_benchmarks(args.benchmark)
    options = _dataset_options(args, names)

    def job(device: str, is_main: bool) -> int:
        args.device = device
        return _run(args, names, options, is_main)

    return run_distributed(args.device, job)


def seeded_segmenter(args: argparse.Namespace, base_options: dict[str, Any] | None = None) -> Segmenter:
    """The segmenter of ``args`` (``base_options``: method options that ``-O`` overrides), with torch,
    NumPy and Python's RNGs seeded with ``args.seed`` right before it is built: random weights are then
    the same in every process of a sharded run and in every rerun, so the weights fingerprint, hence
    the run folder, is the same and a rerun resumes."""
    import numpy as np
    import torch

    random.seed(args.seed)
    np.random.seed(args.seed % 2**32)
    torch.manual_seed(args.seed)
    return segmenter_from_args(args, base_options)


def _segmenter_plan(args: argparse.Namespace, datasets: list[SegDataset]) -> list[tuple[str | None, dict, list]]:
    """``(weights, protocol method options, datasets)`` per segmenter to build, in first-use order: one
    per distinct weights (``--weights`` with ``{fold}``: each PASCAL-5i fold has its own trained
    weights, its classes were held out) and method options (the protocol's for the dataset's benchmark,
    under ``-O``), so benchmarks that share them share one model."""
    from ..eval.protocols import protocol_method_options

    given = method_options_from_args(args)
    plan: dict[str, tuple[str | None, dict, list]] = {}
    for dataset in datasets:
        weights = args.weights
        if isinstance(weights, str) and "{fold}" in weights:
            fold = getattr(dataset, "fold", None)
            if fold is None:
                raise VocabsegError(f"--weights with {{fold}} applies to PASCAL-5i folds, not to {dataset.name}.")
            weights = weights.format(fold=fold)
        options = protocol_method_options(args.protocol, args.method, dataset.settings_key)
        key = json.dumps([weights, {**options, **given}], sort_keys=True, default=str)
        plan.setdefault(key, (weights, options, []))[2].append(dataset)
    return list(plan.values())


def _run(args: argparse.Namespace, names: list[str], options: dict[str, dict[str, Any]], is_main: bool) -> int:
    from ..data import build_dataset
    from ..eval import evaluate, write_summary

    say = print if is_main else (lambda *a, **k: None)
    overrides = settings_from_args(args)
    datasets, missing = [], []
    for name in names:
        try:
            dataset = build_dataset(name, args.data_root, **options[name])
        except DatasetLayoutError as exc:
            if len(names) == 1:
                raise
            missing.append(name)
            say(f"{name}: skipped, {exc}", file=sys.stderr)
            continue
        for note in dataset.notes:
            say(f"{name}: {note}", file=sys.stderr)
        datasets.append(dataset)
    done = 0
    for weights, method_options, group in _segmenter_plan(args, datasets):
        seg = None  # the previous model is freed before the next is built
        seg = seeded_segmenter(argparse.Namespace(**{**vars(args), "weights": weights}), method_options)
        for dataset in group:
            result = evaluate(
                seg,
                dataset,
                protocol=args.protocol,
                overrides=overrides,
                out_dir=args.out,
                limit=args.limit,
                convention=args.convention,
                save_predictions=args.save_predictions,
                images_per_batch=args.images_per_batch,
                progress=not args.no_progress,
                seed=args.seed,
            )
            done += 1
            extra = f", FB-IoU {100 * result.metrics['FB-IoU']:.2f}" if "FB-IoU" in result.metrics else ""
            say(f"{dataset.name}: mIoU {100 * result.miou:.2f}{extra} ({result.info['protocol']['label']}, "
                f"{result.info['convention']}) -> {result.run_dir}/")  # fmt: skip
    if is_main and done:
        say(f"summary: {write_summary(args.out)}")
    if missing:
        say(f"{len(missing)} benchmark(s) not found under {args.data_root}: {', '.join(missing)}", file=sys.stderr)
    return 0 if done else 2
