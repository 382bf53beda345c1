"""``vocabseg methods``: the registered methods and their default settings."""

from __future__ import annotations

import argparse

from ..methods import MethodSpec, get_method_spec, list_methods


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods")
    p.set_defaults(run=run)


def _method_options(spec: MethodSpec) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in spec.options.items()) or "-"


def run(args: argparse.Namespace) -> int:
    header = ("method", "kind", "short side", "crop/stride", "logit scale", "score", "PAMR", "pad", "options")
    rows = []
    for name in list_methods():
        spec = get_method_spec(name)
        d = spec.defaults
        window = "whole" if d.crop == 0 else f"{d.crop}/{d.stride}"
        pamr = f"{d.pamr_steps}x{list(d.pamr_dilations)}" if d.pamr_steps else "off"
        rows.append(
            (
                name,
                "trained" if spec.trainable else "training-free",
                str(d.short_side),
                window,
                f"{d.logit_scale:g}",
                d.score,
                pamr,
                str(d.pad_multiple or "-"),
                _method_options(spec),
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print()
    for name in list_methods():
        spec = get_method_spec(name)
        print(f"{name:10s} {spec.summary}  [{spec.reference}]")
        if spec.trainable:
            print(f"{'':10s} weights: {spec.weights}")
    return 0
