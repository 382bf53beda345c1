"""``vocabseg train --recipe beyond_labels_pascal5i --fold 0 --data-root DATA --out runs/bl-f0``.

The same command runs as one process or under ``torchrun --nproc-per-node N $(which vocabseg) train``
(DDP: gloo on the CPU, nccl on GPUs). Every flag is a shorthand for a ``--set`` override of the
recipe, so the resolved recipe saved with the run says exactly what ran.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import none_or_str, run_distributed


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        description="Train a trained method's head from a recipe. Writes OUT/recipe.json, OUT/metrics.jsonl, "
        "TensorBoard events in OUT/tb/, checkpoints OUT/checkpoint-<step>/ and OUT/checkpoint-last/ "
        "(+ OUT/checkpoint-best/ when validation runs). --resume continues an interrupted run exactly.",
        epilog="Example: vocabseg train --recipe beyond_labels_pascal5i --fold 0 --data-root data/ --out runs/bl-f0; "
        "multi-GPU: torchrun --nproc-per-node 8 $(which vocabseg) train ... --device cuda. "
        "`vocabseg recipes` lists the recipes.",
    )
    p.add_argument("--recipe", "-r", required=True, help="a recipe name (see `vocabseg recipes`)")
    p.add_argument("--data-root", type=Path, required=True, help="the dataset folder (or a folder holding it)")
    p.add_argument("--out", "-o", type=Path, required=True, help="the run folder")
    p.add_argument("--fold", type=int, default=None, help="PASCAL-5i fold held out (data.options.fold)")
    p.add_argument("--model", default=None, help="base CLIP: open_clip name, hf-hub:ID or local-dir:PATH")
    p.add_argument("--pretrained", type=none_or_str, default="keep", help="CLIP weights: tag, file, or 'none'")
    p.add_argument("--max-iters", type=int, default=None, help="optimizer steps (max_iters)")
    p.add_argument("--batch-size", type=int, default=None, help="per-process batch size (batch_size)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    p.add_argument("--val-every", type=int, default=None, help="steps between validations (0: never)")
    p.add_argument("--val-limit", type=int, default=None, help="validate on the first N samples only")
    p.add_argument("--seed", type=int, default=None, help="random seed (seed)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe field, e.g. --set optim.lr=1e-4 --set data.crop=448")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument("--device", default="cpu", help="cpu or cuda (each torchrun process takes cuda:<local rank>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def recipe_from_args(args: argparse.Namespace):
    """The named recipe with the command's flags and ``--set`` overrides applied (flags first)."""
    from ..train import get_recipe

    flags = {
        "data.options.fold": args.fold,
        "model.clip_model": args.model,
        "max_iters": args.max_iters,
        "batch_size": args.batch_size,
        "checkpoint_every": args.checkpoint_every,
        "val_every": args.val_every,
        "seed": args.seed,
    }
    sets = [f"{k}={_json(v)}" for k, v in flags.items() if v is not None]
    if args.pretrained != "keep":
        sets.append(f"model.pretrained={_json(args.pretrained)}")
    return get_recipe(args.recipe).with_overrides([*sets, *args.overrides])


def _json(value) -> str:
    import json

    return json.dumps(value)


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)  # bad recipes and keys fail before anything loads
    return run_distributed(args.device, lambda device, is_main: _train(args, recipe, device, is_main))


def _train(args: argparse.Namespace, recipe, device: str, is_main: bool) -> int:
    from ..train import train
    from ..train.tasks import build_training

    say = print if is_main else (lambda *a, **k: None)
    setup = build_training(recipe, args.data_root, device, val_limit=args.val_limit)
    for note in setup.dataset.notes:
        say(f"{setup.dataset.name}: {note}", file=sys.stderr)
    result = train(
        recipe,
        setup.model,
        setup.dataset,
        args.out,
        device=device,
        resume=args.resume,
        validate=setup.validate,
        progress=not args.no_progress,
    )
    say(f"vocabseg train: done, weights in {result.checkpoint}", file=sys.stderr)
    return 0
