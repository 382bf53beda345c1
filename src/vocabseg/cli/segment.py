"""``vocabseg segment IMAGE... --classes "cat, sofa, tv; monitor"``."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from pathlib import Path

from tqdm import tqdm

from ..errors import SettingsError
from ..segmenter import SegmentOutcome, map_ahead
from ..text.vocabulary import Vocabulary
from .common import add_model_options, segmenter_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
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


def check_output_folder(out: Path) -> None:
    """Refuse an output path that cannot become a writable folder, before any model is loaded."""
    if out.exists() and not out.is_dir():
        raise SettingsError(f"--out {out} is an existing file; give a folder (it is created if missing).")
    existing = out
    while not existing.exists():  # the nearest existing ancestor is where the folder would be created
        existing = existing.parent
    if not existing.is_dir():
        raise SettingsError(f"--out {out}: {existing} is a file, so no folder can be created under it.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SettingsError(f"--out {out}: {existing} is not writable; choose another output folder.")


def _save(jobs: list[tuple[Path, Path]], outcome: SegmentOutcome) -> None:
    """Write an image's result into its folder (nothing for a failed image)."""
    if outcome.ok:
        path, out_dir = jobs[outcome.index]
        outcome.result.info["image"] = str(path)
        outcome.result.save(out_dir)


def run(args: argparse.Namespace) -> int:
    check_output_folder(args.out)
    vocab = Vocabulary.from_file(args.classes_file) if args.classes_file else Vocabulary.parse(args.classes)
    seg = segmenter_from_args(args)
    jobs = list(zip(args.images, _output_dirs(args.images, args.out)))
    failures: list[str] = []
    # the next batch is decoded while this one is segmented, and results are written while the next
    # batch is: one thread each, a batch ahead or behind (files are written whole or not at all)
    outcomes = seg.segment_many(  # checks the classes and settings before the progress bar starts
        args.images,
        vocab,
        background=args.background,
        on_error="skip",
        images_per_batch=args.images_per_batch,
        return_probs=False,  # nothing written needs them
        prefetch=args.images_per_batch,
    )
    save = functools.partial(_save, jobs)
    with (
        contextlib.closing(outcomes),
        contextlib.closing(map_ahead(save, outcomes, args.images_per_batch)) as saved,
        tqdm(total=len(jobs), unit="img", desc="segment", file=sys.stderr) as bar,
    ):
        for outcome, written in saved:
            if isinstance(written, Exception):  # a write that failed (disk full...) stops the run
                raise written
            if not outcome.ok:  # one bad file does not stop the others
                failures.append(str(outcome.error))
                bar.write(f"skipped: {outcome.error}")
            bar.update(1)
    done = len(jobs) - len(failures)
    print(f"{done} of {len(jobs)} image(s) segmented into {args.out}/", file=sys.stderr)
    if failures:
        print(f"{len(failures)} failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0
