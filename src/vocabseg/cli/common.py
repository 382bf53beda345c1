"""Options shared by every command that builds a model (segment, eval, serve)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from ..inference.config import SCORES, InferenceConfig
from ..io.images import DEFAULT_MAX_PIXELS
from ..methods import list_methods
from ..segmenter import DEFAULT, REQUIRED
from ..text.templates import TEMPLATE_SETS


def none_or_str(value: str) -> str | None:
    """``none`` (any case) -> None: the command-line spelling of "random weights"."""
    return None if value.strip().lower() == "none" else value


_SETTING_HELP = {
    "short_side": "resize so the short side has this many pixels (0: keep the size)",
    "max_long_side": "cap on the resized long side",
    "crop": "sliding-window size in pixels (0: whole image in one pass)",
    "stride": "sliding-window stride in pixels",
    "logit_scale": "temperature applied to the logits (cosine similarities) before scoring",
    "score": "how logits become probabilities: softmax over names, or sigmoid per name",
    "prob_threshold": "pixels below this class probability become 'background'",
    "area_threshold": "drop foreground classes covering less than this fraction of the foreground",
    "pamr_steps": "PAMR refinement iterations (0: off)",
    "pad_multiple": "zero-pad each window to a multiple of this",
    "batch_size": "windows per forward pass",
}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--method", default="proxyclip", choices=list_methods(), help="method (default: proxyclip)")
    g.add_argument(
        "--model",
        default=DEFAULT,
        help="open_clip architecture, hf-hub:ID or local-dir:PATH (default: ViT-B-16, or a trained checkpoint's)",
    )
    g.add_argument(
        "--pretrained",
        type=none_or_str,
        default=DEFAULT,
        help="pretrained tag (openai, laion2b_s34b_b88k, ...), a checkpoint file, or 'none' for random weights "
        "(default: openai, or a trained checkpoint's)",
    )
    g.add_argument(
        "--weights",
        type=none_or_str,
        default=REQUIRED,
        help="trained methods: a checkpoint folder from `vocabseg train`, its model.safetensors, hf-hub:ORG/REPO, "
        "or 'none' for a random head",
    )
    g.add_argument("--vfm", default=None, help="proxy VFM for proxyclip (dino_vitb8, dinov2_vitb14, sam_vitb, ...)")
    g.add_argument(
        "--vfm-pretrained",
        type=none_or_str,
        default="default",
        help="VFM weights: 'default' (hub), a checkpoint file, or 'none' for random weights",
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default: cpu)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    g.add_argument(
        "--templates", default=None, help=f"prompt template set: {', '.join(TEMPLATE_SETS)} (default: openai80)"
    )
    g.add_argument("--surgery", action="store_true", help="apply the CLIP-Surgery feature adjustment")
    g.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse images with more pixels (default: {DEFAULT_MAX_PIXELS:,})",
    )
    s = parser.add_argument_group("inference settings (default: the method's published settings)")
    for f in fields(InferenceConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "pamr_dilations":
            s.add_argument(flag, type=int, nargs="+", default=None, help="PAMR dilations")
            continue
        if f.name == "score":
            s.add_argument(flag, choices=SCORES, default=None, help=_SETTING_HELP[f.name])
            continue
        kind = float if f.type in ("float", float) else int
        s.add_argument(flag, type=kind, default=None, help=_SETTING_HELP.get(f.name, f.name))


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(InferenceConfig) if getattr(args, f.name) is not None}


def segmenter_from_args(args: argparse.Namespace):
    from ..segmenter import Segmenter

    return Segmenter(
        method=args.method,
        model=args.model,
        pretrained=args.pretrained,
        weights=args.weights,
        vfm=args.vfm,
        vfm_pretrained=args.vfm_pretrained,
        device=args.device,
        dtype=args.dtype,
        templates=args.templates,
        surgery=args.surgery,
        max_pixels=args.max_pixels,
        **settings_from_args(args),
    )


def run_distributed(device: str, job: Callable[[str, bool], int]) -> int:
    """Run ``job(process_device, is_main)`` alone or as one torchrun worker (eval and train alike).

    Under torchrun a user error is printed by the rank that hit it and the worker ends through
    :func:`~vocabseg.eval.distributed.exit_process` (gloo's teardown race); alone, errors propagate
    to ``main``, which prints them once.
    """
    from ..errors import VocabsegError
    from ..eval.distributed import exit_process, init_distributed, process_device

    world = init_distributed(device)
    code = 2
    try:
        code = job(process_device(device, world), world.is_main)
    except VocabsegError as exc:
        if not world.distributed:
            raise
        print(f"vocabseg: error (rank {world.rank}): {exc}", file=sys.stderr)
    if world.distributed:
        exit_process(code)
    return code
