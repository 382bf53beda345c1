"""``vocabseg convert-weights model_base.pth runs/catseg-base --method catseg``: a released checkpoint, once.

Reads an official release (a detectron2 ``{"model": state_dict}`` file, see
:mod:`vocabseg.methods.official`), converts it strictly to the method's module and writes our
checkpoint folder (``config.json``, ``model.safetensors``, ``manifest.json``), which ``--weights``
then loads without converting again and without any download (CLIP's tensors are in it).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-weights",
        description="Convert an official release of a trained method (e.g. CAT-Seg's model_base.pth) into a "
        "vocabseg checkpoint folder, checking every tensor against the method.",
        epilog="Then: vocabseg segment IMAGE -c 'cat, dog' --method catseg --weights OUT_DIR",
    )
    p.add_argument("input", type=Path, help="the released checkpoint (.pth: a detectron2 {'model': state_dict})")
    p.add_argument("output", type=Path, help="the checkpoint folder to write (must not exist yet)")
    p.add_argument("--method", required=True, help="the method the release belongs to (catseg, ...)")
    p.add_argument(
        "--model",
        default=None,
        help="open_clip architecture of its CLIP, if the converter cannot tell it (default: read off the shapes)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import SettingsError
    from ..methods.official import convert_official, official_formats
    from ..train.checkpoint import write_checkpoint

    if not args.input.is_file():
        raise SettingsError(f"{args.input}: no such file; give the released checkpoint (.pth).")
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        raise SettingsError(f"{args.output} already exists and is not empty; give a new folder (or remove it).")
    if args.method not in official_formats():
        raise SettingsError(
            f"--method {args.method!r}: no converter for its releases; there are for "
            f"{', '.join(sorted(official_formats()))}."
        )
    converted = convert_official(args.input, args.method, base_model=args.model)
    state = {k: v.contiguous() for k, v in converted.state.items()}
    write_checkpoint(args.output, model_state=state, config=converted.config(), step=0, recipe="")
    base = converted.clip["model"]
    print(
        f"Wrote {args.output}: {args.method} on {base} ({len(state)} tensors, CLIP included), "
        f"options {converted.options}.\nUse it with: --method {args.method} --weights {args.output}"
    )
    return 0
