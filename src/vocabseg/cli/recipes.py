"""``vocabseg recipes``: the training recipes and their key settings."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes")
    p.add_argument("name", nargs="?", help="show one recipe in full (JSON)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..train import get_recipe, list_recipes

    if args.name:
        print(json.dumps(get_recipe(args.name).to_dict(), indent=2))
        return 0
    header = ("recipe", "method", "CLIP", "data", "crop", "batch", "iters", "optimizer", "schedule")
    rows = []
    for name in list_recipes():
        r = get_recipe(name)
        mults = ", ".join(f"{k}×{v:g}" for k, v in r.optim.lr_mult.items())
        rows.append((
            name, r.model.method, f"{r.model.clip_model}/{r.model.pretrained}", r.data.dataset, str(r.data.crop),
            str(r.batch_size), str(r.max_iters), f"{r.optim.name} {r.optim.lr:g}" + (f" ({mults})" if mults else ""),
            f"{r.schedule.name}, warm-up {r.schedule.warmup_iters}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print()
    from ..train.tasks import TRAIN_DATA

    for name in list_recipes():
        r = get_recipe(name)
        print(f"{name}: {r.summary}" + (f" [{r.reference}]" if r.reference else ""))
        if r.data.dataset in TRAIN_DATA:
            print(f"  data {r.data.dataset}: {TRAIN_DATA[r.data.dataset].description}")
    return 0
