"""``vocabseg segment IMAGE... --classes "cat, sofa, tv; monitor"``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from ..text.vocabulary import Vocabulary
from .common import add_model_options, segmenter_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment images with a list of class names",
        description="Label every pixel of each IMAGE with one of the given classes. Writes OUT/<image>/"
        "mask.png (palette PNG of class indices), overlay.png (image + colours + legend) and result.json.",
        epilog='Classes: "car, road, person; man; woman" = 3 classes, the last with 3 synonyms (`;`).',
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    classes = p.add_mutually_exclusive_group(required=True)
    classes.add_argument("--classes", "-c", help='comma-separated classes, ";" between synonyms')
    classes.add_argument("--classes-file", type=Path, help="one class per line, synonyms separated by ; or ,")
    p.add_argument(
        "--background",
        default=None,
        help='names that mean "background" (e.g. "sky; wall; floor"): adds a background class',
    )
    p.add_argument("--out", "-o", type=Path, default=Path("out"), help="output folder (default: out/)")
    p.add_argument("--images-per-batch", type=int, default=4, help="images whose windows are batched together")
    add_model_options(p)
    p.set_defaults(run=run)


def _output_dirs(images: list[Path], out: Path) -> list[Path]:
    """One folder per image, named after it; repeated names get a numeric suffix."""
    seen: dict[str, int] = {}
    dirs = []
    for path in images:
        stem = path.stem or "image"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        dirs.append(out / (stem if n == 0 else f"{stem}_{n}"))
    return dirs


def run(args: argparse.Namespace) -> int:
    vocab = Vocabulary.from_file(args.classes_file) if args.classes_file else Vocabulary.parse(args.classes)
    seg = segmenter_from_args(args)
    jobs = list(zip(args.images, _output_dirs(args.images, args.out)))
    failures: list[str] = []
    outcomes = seg.segment_many(  # checks the classes and settings before the progress bar starts
        args.images, vocab, background=args.background, on_error="skip", images_per_batch=args.images_per_batch
    )
    with tqdm(total=len(jobs), unit="img", desc="segment", file=sys.stderr) as bar:
        for outcome in outcomes:
            path, out_dir = jobs[outcome.index]
            if outcome.ok:
                outcome.result.info["image"] = str(path)
                outcome.result.save(out_dir)
            else:  # one bad file does not stop the others
                failures.append(str(outcome.error))
                bar.write(f"skipped: {outcome.error}")
            bar.update(1)
    done = len(jobs) - len(failures)
    print(f"{done} of {len(jobs)} image(s) segmented into {args.out}/", file=sys.stderr)
    if failures:
        print(f"{len(failures)} failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0
